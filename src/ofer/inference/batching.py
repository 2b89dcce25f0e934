"""How many images test.py reconstructs together (``--batch auto``): ``auto_batch_size``.

A batch of B images samples B·N identity rows and B·M expression rows per network call and
builds B·(N + M) FLAME meshes. On a GPU one call at 100 rows leaves the device mostly idle
(its time is launches, not arithmetic), so images go together until the calls have
``GPU_ROWS`` rows or the meshes would fill ``GPU_MEMORY_FRACTION`` of the free memory. On a
CPU the calls are arithmetic already at a few dozen rows: batching there saves only
per-operation overhead, which matters for small N and M only (``bench/batch_speed.py``).
"""

from __future__ import annotations

import math

import torch

# CPU: images go together until a call has CPU_ROWS rows (bench/batch_speed.py on the 2-core CPU:
# at N = M = 100 batch 2 gave nothing over batch 1; at the demo's N = 32, M = 16, see the README)
CPU_ROWS = 100
# GPU (not measured on a GPU yet: bench/gpu_check.sh times batch 1, 8, 32 and this choice)
GPU_ROWS = 3200
GPU_MEMORY_FRACTION = 0.5
# Peak bytes per mesh vertex of one sample, measured as the slope of the peak RSS over batch
# sizes on the CPU at FLAME size (bench/batch_speed.py --memory): the meshes (x, y, z float32),
# FLAME's blend shapes and skinning intermediates, IdRank's features and the outputs' copies.
BYTES_PER_SAMPLE_VERTEX = 120
MAX_BATCH = 64


def auto_batch_size(device: torch.device | str, numsamples: int, num_expressions: int, num_vertices: int,
                    num_images: int | None = None, free_bytes: int | None = None) -> int:
    """The number of images to reconstruct together on ``device``.

    Rule: B = ⌊rows / max(N, M)⌋ with rows = ``CPU_ROWS`` on a CPU and ``GPU_ROWS`` on a GPU, at
    least 1 and at most ``MAX_BATCH``; on a GPU also at most what fits in
    ``GPU_MEMORY_FRACTION`` of the free memory (``torch.cuda.mem_get_info``, or ``free_bytes``)
    at ``BYTES_PER_SAMPLE_VERTEX`` per sample and vertex, i.e. (N + M)·V·120 bytes per image:
    about 120 MB at N = M = 100 and FLAME's 5023 vertices (measured as peak RSS on a CPU; the
    GPU holds the same tensors, plus the CUDA graphs' pools, a few MB per graph); and at most
    ``num_images`` when given (the images there are to reconstruct).

    Args:
        device: where the pipeline runs.
        numsamples, num_expressions: N and M (test.numsamples, test.num_expressions).
        num_vertices: V, the FLAME model's vertex count.
        num_images: images to reconstruct (this rank's), if known.
        free_bytes: free device memory, instead of asking CUDA (for a plan made elsewhere).
    """
    device = torch.device(device)
    widest = max(numsamples, num_expressions, 1)
    batch = (GPU_ROWS if device.type == "cuda" else CPU_ROWS) // widest
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(device)
        per_image = (numsamples + num_expressions) * num_vertices * BYTES_PER_SAMPLE_VERTEX
        batch = min(batch, math.floor(GPU_MEMORY_FRACTION * free_bytes / per_image))
    if num_images is not None:
        batch = min(batch, num_images)
    return max(1, min(batch, MAX_BATCH))
