"""Where the samplers' Gaussian noise comes from: one generator, or one generator per image.

Sampling draws N samples for each of B images in one batch of B·N rows, the N rows of an
image adjacent. With one ``torch.Generator`` the noise of an image depends on the images
batched before it; with one generator per image (a sequence of B generators) each image's
rows are drawn from its own generator, so its samples depend on its seed only, not on its
batch or its place in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32) from one generator or one per image.

    With a sequence of B generators, ``shape[0]`` must be a multiple of B; image i gets the
    rows i·shape[0]/B … (i+1)·shape[0]/B − 1, drawn from generator i.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    generators = list(generator)
    if not generators or shape[0] % len(generators):
        raise ValueError(f"randn: {shape[0]} rows cannot be split over {len(generators)} per-image generators")
    rows = shape[0] // len(generators)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, device=device) for g in generators])  # (B·rows, …)
