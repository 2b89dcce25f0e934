"""The 1-D U-Net that predicts the diffusion noise for IdGen and ExpGen (SPEC §4).

The FLAME coefficient vector (B, D) is treated as D channels of length 1. Every module
keeps the attribute names of the original network so that ``state_dict()`` has the
original key names and shapes (``ofer_state_dict_layout.txt``), plus the 16 attention
projections per attention block (``…to_qkv.{i}.weight``), which the original never
registered and therefore never trained or saved. ``is_projection_key`` tells those apart
so the checkpoint loader can load original files and initialise the missing projections.

IdGen and ExpGen differ only by configuration:
``Denoiser(300, 512, [300, 50, 10])`` and ``Denoiser(53, 1024, [53, 25, 10])``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TIME_DIM = 512  # size of the sinusoidal time embedding and of time_mlp
ATTN_HEADS = 4
ATTN_DIM_HEAD = 32

_PROJECTION_KEY = re.compile(r"(?:^|\.)to_qkv\.\d+\.weight$")


def is_projection_key(key: str) -> bool:
    """True for a state-dict key of one of the attention projections (``…to_qkv.{i}.weight``).

    These are the only keys of ours that the original checkpoints lack.
    """
    return _PROJECTION_KEY.search(key) is not None


def original_state_dict_keys(model: nn.Module) -> list[str]:
    """The model's state-dict keys without the attention projections, in order.

    For a ``Denoiser`` these are exactly the keys of the original layout.
    """
    return [key for key in model.state_dict() if not is_projection_key(key)]


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of integer steps: t (B,) -> [sin(t·f), cos(t·f)] (B, dim)."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"SinusoidalPosEmb: dim must be even and >= 4, got {dim}")
        self.dim = dim
        self.theta = theta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-k * math.log(self.theta) / (half - 1))  # (half,)
        angles = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)


class Block(nn.Module):
    """1×1 conv -> GroupNorm(1) -> optional x·(scale+1)+shift -> SiLU, on (B, C, 1)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv1d(dim, dim_out, 1)
        self.norm = nn.GroupNorm(1, dim_out)
        self.act = nn.SiLU()

    def forward(
        self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a residual; the first is modulated by [time embedding, context]."""

    def __init__(self, dim: int, dim_out: int, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim_out))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, dim, 1), cond (B, cond_dim) -> (B, dim_out, 1)."""
        scale_shift = self.mlp(cond)[:, :, None].chunk(2, dim=1)  # 2 × (B, dim_out, 1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class RMSNorm(nn.Module):
    """Channel RMS normalisation: normalize(x, dim=1)·g·√dim on (B, dim, L)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.g * self.scale


class PreNorm(nn.Module):
    """Apply ``fn`` to the RMS-normalised input."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn  # registered before `norm` to keep the original key order
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """x + fn(x)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class Attention(nn.Module):
    """Attention over ``numqkv`` tokens made from a length-1 feature (SPEC §4).

    Projection i maps x (B, dim, 1) to one token's q, k, v (each ATTN_HEADS × ATTN_DIM_HEAD).
    Per head the numqkv tokens attend to each other; the result (B, 128, numqkv) is mapped
    back by ``to_out`` (1×1 conv to dim channels) and ``to_out_linear`` (numqkv tokens -> 1).
    The projections are computed with one convolution over their stacked weights; the
    weights stay separate parameters so the state dict has one key per projection.
    """

    def __init__(self, dim: int, numqkv: int = 16) -> None:
        super().__init__()
        self.numqkv = numqkv
        hidden = ATTN_HEADS * ATTN_DIM_HEAD
        self.to_qkv = nn.ModuleList(
            nn.Conv1d(dim, 3 * hidden, 1, bias=False) for _ in range(numqkv)
        )
        self.to_out = nn.Conv1d(hidden, dim, 1)
        self.to_out_linear = nn.Linear(numqkv, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, 1) -> (B, dim, 1)."""
        batch = x.shape[0]
        n, heads, dim_head = self.numqkv, ATTN_HEADS, ATTN_DIM_HEAD
        weight = torch.cat([proj.weight for proj in self.to_qkv], dim=0)  # (n·384, dim, 1)
        qkv = F.conv1d(x, weight)  # (B, n·384, 1)
        # Channels of projection i are [q | k | v], each head-major (h d).
        qkv = qkv.view(batch, n, 3, heads, dim_head)  # (B, n, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, h, n, d)
        sim = (q * dim_head**-0.5) @ k.transpose(-1, -2)  # (B, h, n, n)
        out = sim.softmax(dim=-1) @ v  # (B, h, n, d)
        out = out.permute(0, 1, 3, 2).reshape(batch, heads * dim_head, n)  # (B, h·d, n)
        out = self.to_out(out)  # (B, dim, n)
        return self.to_out_linear(out)  # (B, dim, 1)


def attention_block(dim: int, numqkv: int) -> Residual:
    """Residual(PreNorm(Attention)), the attention unit used throughout the U-Net."""
    return Residual(PreNorm(dim, Attention(dim, numqkv)))


class Resample(nn.Sequential):
    """Down/Upsample: Linear(a, a) -> SiLU -> Linear(a, b) on the vector of a (B, a, 1) feature."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(nn.Linear(dim_in, dim_in), nn.SiLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, 0])[:, :, None]  # (B, a, 1) -> (B, b, 1)


class Denoiser(nn.Module):
    """Noise predictor ε̂(x_t, t, context) of IdGen / ExpGen (SPEC §4).

    Args:
        flame_dim: D, size of the diffused coefficient vector (equals ``dims[0]``).
        context_dim: C, size of the conditioning vector.
        dims: channel sizes of the U-Net levels, e.g. [300, 50, 10].
        numqkv: tokens (projections) per attention block.
    """

    def __init__(
        self, flame_dim: int, context_dim: int, dims: Sequence[int], numqkv: int = 16
    ) -> None:
        super().__init__()
        dims = list(dims)
        if len(dims) < 2 or dims[0] != flame_dim:
            raise ValueError(
                f"Denoiser: dims must have >= 2 entries starting with flame_dim={flame_dim}, "
                f"got {dims}"
            )
        self.flame_dim = flame_dim
        self.context_dim = context_dim
        cond_dim = TIME_DIM + context_dim
        pairs = list(itertools.pairwise(dims))

        # Registration order follows the original state dict.
        self.init_conv = nn.Conv1d(flame_dim, flame_dim, 1)
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(TIME_DIM),
            nn.Linear(TIME_DIM, TIME_DIM),
            nn.GELU(),
            nn.Linear(TIME_DIM, TIME_DIM),
        )
        self.downs = nn.ModuleList(
            nn.ModuleList(
                [
                    ResnetBlock(d_in, d_in, cond_dim),
                    ResnetBlock(d_in, d_in, cond_dim),
                    attention_block(d_in, numqkv),
                    Resample(d_in, d_out),
                ]
            )
            for d_in, d_out in pairs
        )
        self.ups = nn.ModuleList(
            nn.ModuleList(
                [
                    Resample(d_in, d_out),
                    ResnetBlock(2 * d_out, d_out, cond_dim),
                    ResnetBlock(2 * d_out, d_out, cond_dim),
                    attention_block(d_out, numqkv),
                ]
            )
            for d_out, d_in in reversed(pairs)
        )
        # One final stage, nested as in the original (keys `finals.0.{0,1,2}`).
        self.finals = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        ResnetBlock(2 * flame_dim, flame_dim, cond_dim),
                        attention_block(flame_dim, numqkv),
                        nn.Conv1d(flame_dim, flame_dim, 1),
                    ]
                )
            ]
        )
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, cond_dim)
        self.mid_attn = attention_block(mid, numqkv)
        self.mid_block2 = ResnetBlock(mid, mid, cond_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, D), t (B,) integer steps, context (B, C) -> predicted noise (B, D)."""
        batch = x.shape[0]
        if x.shape != (batch, self.flame_dim):
            raise ValueError(f"Denoiser: x must be (B, {self.flame_dim}), got {tuple(x.shape)}")
        if t.shape != (batch,):
            raise ValueError(f"Denoiser: t must be ({batch},), got {tuple(t.shape)}")
        if context.shape != (batch, self.context_dim):
            raise ValueError(
                f"Denoiser: context must be ({batch}, {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        cond = torch.cat([self.time_mlp(t), context], dim=1)  # (B, 512 + C)

        x = self.init_conv(x[:, :, None])  # (B, D, 1)
        r = x.clone()
        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, cond)
            skips.append(x)
            x = attn(block2(x, cond))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, cond)), cond)

        for upsample, block1, block2, attn in self.ups:
            x = upsample(x)
            x = block1(torch.cat([x, skips.pop()], dim=1), cond)
            x = block2(torch.cat([x, skips.pop()], dim=1), cond)
            x = attn(x)

        final_block, final_attn, final_conv = self.finals[0]
        x = final_block(torch.cat([x, r], dim=1), cond)  # (B, D, 1)
        x = final_conv(final_attn(x))
        return x[:, :, 0]  # (B, D)
