"""Small CNN stand-ins for ArcFace and FaRL, for CPU tests and the synthetic demo.

Same inputs and outputs as the real encoders (112 -> 512 unit-norm; 224 -> 512) at about 160k
parameters each, so a whole pipeline runs on a CPU in seconds. Their weights are trained with
the stage that uses them; there are no pretrained tiny weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofer.encoders.normalise import ARCFACE_SIZE, FARL_SIZE, check_image_batch

EMBEDDING_DIM = 512


def _conv_block(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


class _TinyCNN(nn.Module):
    """Patchify stem down to 56x56, three stride-2 conv blocks (56 -> 7), average pool, linear."""

    input_size: int

    def __init__(self) -> None:
        super().__init__()
        patch = self.input_size // 56
        self.body = nn.Sequential(
            _conv_block(3, 16, patch, patch, 0),  # (B, 16, 56, 56)
            _conv_block(16, 32, 3, 2, 1),  # (B, 32, 28, 28)
            _conv_block(32, 64, 3, 2, 1),  # (B, 64, 14, 14)
            _conv_block(64, 128, 3, 2, 1),  # (B, 128, 7, 7)
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128)
        )
        self.fc = nn.Linear(128, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.input_size, type(self).__name__)
        return self.fc(self.body(x))


class TinyArcFace(_TinyCNN):
    """(B, 3, 112, 112) ArcFace-normalised crops -> (B, 512) L2-normalised codes."""

    input_size = ARCFACE_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=-1)


class TinyFarl(_TinyCNN):
    """(B, 3, 224, 224) CLIP-normalised crops -> (B, 512) features (not normalised)."""

    input_size = FARL_SIZE
