"""FaRL image encoder: the OpenAI-CLIP ViT-B/16 image tower carrying FaRL's face weights.

The tower is written here (``VisionTransformer``, OpenAI's CLIP layout with QuickGELU
activations, the ``ViT-B-16-quickgelu`` of open_clip) rather than built by open_clip: importing
open_clip pulls in torchvision and torch._dynamo, which cost test.py ~3 s of start-up and
~220 MB of memory for a network of five kinds of layer. The modules carry OpenAI's key names
(`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer.resblocks.N.attn.in_proj_weight`, `ln_post`, `proj`), and the tower is stored under
the attribute `visual`, so this module's state dict has exactly the `visual.*` keys of an
OpenAI-format CLIP state dict such as the FaRL release file, and of the checkpoints written
when the tower was open_clip's. A test checks it against open_clip's tower on the same weights.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ofer.encoders.normalise import FARL_SIZE, check_image_batch
from ofer.encoders.weights import compare_state_dicts, read_state_dict

logger = logging.getLogger(__name__)

FARL_WEIGHTS = "pretrained/FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
VISUAL_PREFIX = "visual."
# ViT-B/16 image tower of CLIP: 224 px, 16 px patches, 12 blocks of width 768 (12 heads of 64),
# 512-d output.
VIT_PATCH, VIT_WIDTH, VIT_LAYERS, VIT_HEADS, VIT_OUT = 16, 768, 12, 12, 512


class QuickGELU(nn.Module):
    """x·σ(1.702·x), the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), on (B, L, width)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ResidualAttentionBlocks (``resblocks``, OpenAI's name)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: (B, 3, S, S) -> (B, output_dim), the class token's projected feature.

    Patches embedded by a strided convolution, a learned class token prepended, learned
    positions added, ``ln_pre``, the transformer, then ``ln_post`` of the class token and the
    ``proj`` matrix. Initialised as OpenAI's CLIP (normal embeddings scaled by width^-0.5).
    """

    def __init__(self, image_size: int = FARL_SIZE, patch_size: int = VIT_PATCH, width: int = VIT_WIDTH,
                 layers: int = VIT_LAYERS, heads: int = VIT_HEADS, output_dim: int = VIT_OUT) -> None:
        super().__init__()
        scale = width**-0.5
        tokens = (image_size // patch_size) ** 2 + 1  # the patches and the class token
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, width, g, g) -> (B, g·g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + g·g, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)


class FarlEncoder(nn.Module):
    """(B, 3, 224, 224) CLIP-normalised face crops -> (B, 512) FaRL features (not normalised).

    Built with random weights; load FaRL's with `load_farl_weights` (86.2 M parameters).
    """

    def __init__(self) -> None:
        super().__init__()
        self.visual = VisionTransformer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, FARL_SIZE, type(self).__name__)
        return self.visual(x)


def load_farl_state_dict(module: FarlEncoder, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load the image tower of an OpenAI-format CLIP state dict into `module` in place.

    Keys outside `visual.` (the text tower, `logit_scale`, ...) are ignored; a bare image-tower
    state dict (keys like `conv1.weight`) is accepted too; unexpected
    `visual.` keys are logged as a warning. Missing image-tower keys or shape mismatches raise a
    ValueError naming `source` (the file the dict came from).
    """
    visual = {k: v for k, v in state_dict.items() if k.startswith(VISUAL_PREFIX)}
    if not visual and "conv1.weight" in state_dict:  # a bare image tower (no `visual.` prefix)
        visual = {VISUAL_PREFIX + k: v for k, v in state_dict.items()}
    diff = compare_state_dicts(module.state_dict(), visual)
    if diff.missing or diff.mismatched:
        raise ValueError(
            f"{source} does not hold a CLIP ViT-B/16 image tower in OpenAI key naming: "
            f"missing keys {diff.missing}, shape mismatches {diff.mismatched}"
        )
    if diff.unexpected:
        logger.warning("%s: ignoring unknown image-tower keys %s", source, diff.unexpected)
    module.load_state_dict({k: v for k, v in visual.items() if k not in diff.unexpected})


def load_farl_weights(module: FarlEncoder, path: str | Path = FARL_WEIGHTS) -> None:
    """Load FaRL's released weights (a dict whose 'state_dict' is an OpenAI-CLIP state dict).

    Read with `torch.load(weights_only=True)`; a bare OpenAI-format state dict also works.

    Raises:
        FileNotFoundError: `path` does not exist (the message says where to get the file).
        ValueError: the file is unreadable or lacks image-tower keys, or shapes differ.
    """
    state_dict = read_state_dict(
        path,
        f"download FaRL-Base-Patch16-LAIONFace20M-ep64.pth from the FaRL GitHub release "
        f"(https://github.com/FacePerceiver/FaRL, 'Releases') and put it at {path} "
        f"(default location {FARL_WEIGHTS})",
    )
    load_farl_state_dict(module, state_dict, str(path))
    logger.info("loaded FaRL weights from %s", path)
