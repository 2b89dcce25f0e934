"""How many images test.py reconstructs together (``--batch auto``): ``auto_batch_size``.

A batch of B images samples B·N identity rows and B·M expression rows per network call and
builds B·(N + M) FLAME meshes. On a GPU one call at 100 rows leaves the device mostly idle
(its time is launches, not arithmetic), so images go together until the calls have
``GPU_ROWS`` rows or the meshes would fill ``GPU_MEMORY_FRACTION`` of the free memory. On a
CPU batching saves per-operation overhead and per-image work done once per batch: measured
with ``bench/batch_speed.py`` on the 2-core CPU (tiny encoders, ``dpmpp_2m`` 10, two runs on a
loaded host), at N = M = 100 batch 4 took 0.65 and 0.62 of batch 1's seconds per image, batch
8 0.57 and 0.60; at the demo's N = 32, M = 16 (``ddim`` 25) batches of 2 to 8 took 0.35 to
0.64 (batch 3 0.35 and 8 0.39 in one run; 2 0.44, 4 0.46 and 8 0.64 in the other). So images
go together up to ``CPU_ROWS`` rows per call there too.
"""

from __future__ import annotations

import math

import torch

CPU_ROWS = 800  # N = M = 100: batches of 8
# GPU (not measured on a GPU yet: bench/gpu_check.sh times batch 1, 8, 32 and this choice)
GPU_ROWS = 3200
GPU_MEMORY_FRACTION = 0.5
# Bytes per sample and mesh vertex one call needs: twice the 65 measured on the CPU at N = M = 100
# (bench/batch_speed.py --memory: 128 MB at batch 4, 255 MB at batch 8 on the 2434-vertex model,
# 32 MB per image): the meshes, FLAME's blend shapes and skinning, IdRank's features, the outputs'
# copies (80 at the demo's sizes, 9.4 MB per image); the margin covers the GPU allocator's
# rounding and the CUDA graphs' pools.
BYTES_PER_SAMPLE_VERTEX = 132
MAX_BATCH = 64


def auto_batch_size(device: torch.device | str, numsamples: int, num_expressions: int, num_vertices: int,
                    num_images: int | None = None, free_bytes: int | None = None) -> int:
    """The number of images to reconstruct together on ``device``.

    Rule: B = ⌊rows / max(N, M)⌋ with rows = ``CPU_ROWS`` on a CPU and ``GPU_ROWS`` on a GPU, at
    least 1 and at most ``MAX_BATCH``; on a GPU also at most what fits in
    ``GPU_MEMORY_FRACTION`` of the free memory (``torch.cuda.mem_get_info``, or ``free_bytes``)
    at ``BYTES_PER_SAMPLE_VERTEX`` per sample and vertex, i.e. (N + M)·V·132 bytes per image:
    133 MB at N = M = 100 and FLAME's 5023 vertices, twice the 65 MB measured on a CPU (the GPU
    holds the same tensors), so that an H200's ~139 GB are never the limit at these sizes; and
    at most ``num_images`` when given (the images there are to reconstruct). On a GPU this
    gives 32 images at N = M = 100: an estimate until ``bench/gpu_check.sh`` times it.

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
