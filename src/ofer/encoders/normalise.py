"""Input conventions of the image encoders, kept in one place.

ArcFace takes 112x112 RGB crops scaled to [-1, 1] by (x - 127.5) / 127.5; FaRL (an OpenAI-CLIP
ViT-B/16) takes 224x224 RGB crops in [0, 1] standardised with CLIP's mean and std. Every encoder
checks its input with `check_image_batch` so a wrong crop size fails with a clear message instead
of a shape error deep inside the network.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

ARCFACE_SIZE = 112
# Every stored ArcFace input (test.py's and the training data's) must lie in this range: it is
# (pixel - 127.5) / 127.5, within [-1, 1]; the margin allows resampling and float16 rounding but
# catches 0-255 pixels or other normalisations.
ARCFACE_RANGE = (-1.05, 1.05)
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


def crop_to_clip_input(image_bgr: np.ndarray) -> np.ndarray:
    """Resize (bicubic) the short side to 224 and centre-crop: (H, W, 3) -> (224, 224, 3) uint8."""
    height, width = image_bgr.shape[:2]
    if (height, width) == (FARL_SIZE, FARL_SIZE):
        return image_bgr
    scale = FARL_SIZE / min(height, width)
    new_w, new_h = max(FARL_SIZE, round(width * scale)), max(FARL_SIZE, round(height * scale))
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    top, left = (new_h - FARL_SIZE) // 2, (new_w - FARL_SIZE) // 2
    return resized[top : top + FARL_SIZE, left : left + FARL_SIZE]


_CLIP_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)
_CLIP_STD = np.asarray(CLIP_STD, dtype=np.float32)


def clip_normalise_bgr(image_bgr: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 BGR -> (3, 224, 224) float32 RGB, (x/255 - CLIP mean) / CLIP std."""
    rgb = image_bgr[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((rgb - _CLIP_MEAN) / _CLIP_STD).transpose(2, 0, 1))


def clip_to_bgr(image: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 CLIP-normalised RGB -> (H, W, 3) uint8 BGR, for pictures (inverse of clip_normalise_bgr)."""
    rgb = (image.transpose(1, 2, 0) * _CLIP_STD + _CLIP_MEAN) * 255.0
    return np.ascontiguousarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)[..., ::-1])


def check_image_batch(images: torch.Tensor, size: int, encoder: str) -> None:
    """Raise ValueError unless `images` is a (B, 3, size, size) batch with B >= 1."""
    if images.dim() != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"{encoder} expects a batch of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
