"""Input conventions of the image encoders, kept in one place.

ArcFace takes 112x112 RGB crops scaled to [-1, 1] by (x - 127.5) / 127.5; FaRL (an OpenAI-CLIP
ViT-B/16) takes 224x224 RGB crops in [0, 1] standardised with CLIP's mean and std. Every encoder
checks its input with `check_image_batch` so a wrong crop size fails with a clear message instead
of a shape error deep inside the network.
"""

from __future__ import annotations

import numpy as np
import torch

ARCFACE_SIZE = 112
FARL_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def arcface_normalise(images_rgb: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Scale RGB pixel values in [0, 255] to ArcFace's input range [-1, 1].

    Works elementwise, so any layout ((3,112,112), (B,3,112,112), HWC) and both numpy arrays and
    tensors are accepted; the result has the same type and shape.
    """
    return (images_rgb - 127.5) / 127.5


def clip_normalise(images_rgb: torch.Tensor) -> torch.Tensor:
    """Standardise RGB images in [0, 1] with CLIP's per-channel mean and std.

    Args:
        images_rgb: (B, 3, H, W) or (3, H, W) float tensor, RGB in [0, 1].
    Returns:
        Tensor of the same shape.
    """
    mean = torch.tensor(CLIP_MEAN, dtype=images_rgb.dtype, device=images_rgb.device)
    std = torch.tensor(CLIP_STD, dtype=images_rgb.dtype, device=images_rgb.device)
    return (images_rgb - mean[:, None, None]) / std[:, None, None]


def check_image_batch(images: torch.Tensor, size: int, encoder: str) -> None:
    """Raise ValueError unless `images` is a (B, 3, size, size) batch with B >= 1."""
    if images.dim() != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"{encoder} expects a batch of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
