"""`--batch auto`: ofer.inference.batching.auto_batch_size's rule."""

import torch

from ofer.inference import batching
from ofer.inference.batching import auto_batch_size

CUDA = torch.device("cuda")


def test_cpu_fills_the_calls_up_to_its_row_target():
    assert auto_batch_size("cpu", 100, 100, 5023) == batching.CPU_ROWS // 100 > 1
    assert auto_batch_size("cpu", 32, 16, 2434) == batching.CPU_ROWS // 32
    assert auto_batch_size("cpu", 5, 5, 2434, num_images=3) == 3  # never more than the images there are


def test_gpu_fills_the_calls_up_to_the_row_target_and_the_memory_fraction():
    plenty = 100 * 2**30
    assert auto_batch_size(CUDA, 100, 100, 5023, free_bytes=plenty) == batching.GPU_ROWS // 100
    per_image = 200 * 5023 * batching.BYTES_PER_SAMPLE_VERTEX
    tight = int(3.5 * per_image / batching.GPU_MEMORY_FRACTION)  # room for 3.5 images' meshes
    assert auto_batch_size(CUDA, 100, 100, 5023, free_bytes=tight) == 3
    assert auto_batch_size(CUDA, 100, 100, 5023, free_bytes=1) == 1  # at least one image
    assert auto_batch_size(CUDA, 1, 1, 100, free_bytes=plenty) == batching.MAX_BATCH
