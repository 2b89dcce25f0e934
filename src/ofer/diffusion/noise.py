"""Where the samplers' Gaussian noise comes from: one generator, or one generator per image.

Sampling draws N samples for each of B images in one batch of B·N rows, the N rows of an
image adjacent. With one ``torch.Generator`` the noise of an image depends on the images
batched before it; with one generator per image (a sequence of B generators) each image's
rows are drawn from its own generator, so its samples depend on its seed only, not on its
batch or its place in it.

A generator draws on its own device and the noise then moves to the sampling device. The
generators test.py makes are CPU generators (``seeded_generator``): the same seed then gives
the same noise, and so the same samples up to float rounding, on the CPU and on a GPU (a CUDA
generator draws other numbers than a CPU one). Noise bound for a GPU is drawn into pinned
memory and copied without blocking, so that drawing it does not wait for the GPU's queued work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: a noise source that gives the same noise whichever
    device samples (``randn`` moves what it draws)."""
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32) on ``device`` from one generator or one per image.

    Each generator draws on its own device (None: the global generator of ``device``). With a
    sequence of B generators, ``shape[0]`` must be a multiple of B; image i gets the rows
    i·shape[0]/B … (i+1)·shape[0]/B − 1, drawn from generator i.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if generator is None:
        return torch.randn(shape, device=device)
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if not generators or shape[0] % len(generators):
        raise ValueError(f"randn: {shape[0]} rows cannot be split over {len(generators)} per-image generators")
    source = generators[0].device
    if any(g.device != source for g in generators):
        raise ValueError(f"randn: per-image generators on several devices ({sorted({str(g.device) for g in generators})})")
    pinned = source.type == "cpu" and device.type == "cuda"  # a non-blocking copy needs pinned memory
    noise = torch.empty(shape, device=source, pin_memory=pinned)
    rows = shape[0] // len(generators)
    for i, g in enumerate(generators):
        noise[i * rows : (i + 1) * rows].normal_(generator=g)  # (rows, …) of image i, as randn draws them
    return noise.to(device, non_blocking=True)  # from the host: safe without pinning, asynchronous with it
