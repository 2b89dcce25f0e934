"""The 1-D U-Net that predicts the diffusion noise for IdGen and ExpGen (SPEC §4).

The FLAME coefficient vector (B, D) is treated as D channels of length 1. Every module
keeps the attribute names of the original network so that ``state_dict()`` has the
original key names and shapes (``ofer_state_dict_layout.txt``), plus the 16 attention
projections per attention block (``…to_qkv.{i}.weight``), which the original never
registered and therefore never trained or saved. ``is_projection_key`` tells those apart
so the checkpoint loader can load original files and initialise the missing projections.

IdGen and ExpGen differ only by configuration:
``Denoiser(300, 512, [300, 50, 10])`` and ``Denoiser(53, 1024, [53, 25, 10])``.

Inside, features are (B, C) matrices and the 1×1 convolutions run as matrix products on
their (C_out, C_in, 1) weights. ``Denoiser.sampler(context)`` is the inference path of one
sampling run: it walks the same U-Net with what stays fixed during the run computed once
from the module's own weights (the stacked attention projections, packed for oneDNN's matrix
product on a CPU, and the context half of every ResnetBlock's modulation) and the time half
once per step for all rows.
With a bfloat16 ``dtype`` the sampler's products (the 1×1 convolutions, linear layers, stacked
projections and the attention's batched products) run in bfloat16 on weights cast once per
sampler, while the norms (GroupNorm, RMSNorm), the softmax, the modulations and the residual
sums stay float32, and ε̂ is float32: explicit casts, the same on every device, instead of
autocast (whose op lists differ between CPU and CUDA and which, uncached, recasts every weight
per call). Samplers call ``at_step(x, step)`` with the step as a Python int, so that no call
reads a tensor back from the device.
``StaticEps`` runs that step over static buffers, so that it can be captured as a CUDA graph.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

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


def pack_projection(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """A stacked attention projection (out, dim) packed for oneDNN's matrix product, for
    ``project``; unchanged where that kernel does not apply (not a float32 CPU tensor, or a
    PyTorch build without it).

    At the projections' shapes (batch 100 rows, 6144 outputs, 10-300 inputs) oneDNN's product
    on a packed weight is faster than F.linear's (MKL) on the 2-core CPU
    (``bench/projection_speed.py``). ``torch.ops.mkldnn`` is what inductor lowers CPU linears
    to; it has no autograd, so only the sampler uses it.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)
    except (AttributeError, RuntimeError):  # a build without the op
        return weight


def like_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in the dtype of a low-precision weight (a bfloat16 sampler's), so that the product runs
    in it; with a float32 weight x is left as it is (float32, or what training's autocast made it)."""
    return x if weight.dtype == torch.float32 or x.dtype == weight.dtype else x.to(weight.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in the weight's dtype (``like_weight``); the output stays in it."""
    return F.linear(like_weight(x, weight), weight, bias)


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, dim) @ weightᵀ -> (B, out); a weight from ``pack_projection`` runs through oneDNN."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return linear(x, weight)


def pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution applied to length-1 features as a matrix product: (B, C_in) -> (B, C_out)."""
    return linear(x, conv.weight.squeeze(2), conv.bias)  # a view: no copy in backward


class Block(nn.Module):
    """1×1 conv -> GroupNorm(1) -> optional x·(scale+1)+shift -> SiLU, on (B, C) features."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv1d(dim, dim_out, 1)
        self.norm = nn.GroupNorm(1, dim_out)

    def forward(
        self, x: torch.Tensor, gain_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, dim) -> (B, dim_out); ``gain_shift`` = (scale + 1, shift), each (B, dim_out)."""
        x = pointwise(self.proj, x)  # (B, C)
        # GroupNorm with one group over a length-1 feature normalises over the C channels (in float32).
        x = F.layer_norm(x.float(), x.shape[1:], self.norm.weight, self.norm.bias, self.norm.eps)
        if gain_shift is not None:
            gain, shift = gain_shift
            x = torch.addcmul(shift, x, gain)  # x·(scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a residual; the first is modulated by [time embedding, context]."""

    def __init__(self, dim: int, dim_out: int, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim_out))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1) if dim != dim_out else nn.Identity()
        # [1 … 1 | 0 … 0]: turns the mlp's [scale | shift] into [scale + 1 | shift]; not saved
        self.register_buffer("gain_offset", torch.cat([torch.ones(dim_out), torch.zeros(dim_out)]), persistent=False)

    def modulation(self, mlp_out: torch.Tensor) -> torch.Tensor:
        """[scale + 1 | shift] (B, 2·dim_out) from mlp(cond) = [scale | shift]. An offset, so
        the sampler adds it to the context half of the modulation once per run."""
        return mlp_out + self.gain_offset

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """x (B, dim), modulation = ``self.modulation(mlp(cond))`` (B, 2·dim_out) -> (B, dim_out)."""
        gain_shift = modulation.chunk(2, dim=1)  # 2 × (B, dim_out)
        h = self.block2(self.block1(x, gain_shift))
        return h + (x if isinstance(self.res_conv, nn.Identity) else pointwise(self.res_conv, x))


class RMSNorm(nn.Module):
    """Channel RMS normalisation: normalize(x, dim=1)·g·√dim on (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1))  # the original's (1, dim, 1) shape
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1) * (self.g.squeeze(2) * self.scale)  # in float32


class PreNorm(nn.Module):
    """Apply ``fn`` to the RMS-normalised input (extra arguments go to ``fn``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn  # registered before `norm` to keep the original key order
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        return self.fn(self.norm(x), *args)


class Residual(nn.Module):
    """x + fn(x) (extra arguments go to ``fn``)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, *args) + x


class Attention(nn.Module):
    """Attention over ``numqkv`` tokens made from a length-1 feature (SPEC §4).

    Projection i maps x (B, dim) to one token's q, k, v (each ATTN_HEADS × ATTN_DIM_HEAD).
    Per head the numqkv tokens attend to each other; the result (B, 128, numqkv) is mapped
    back by ``to_out`` (1×1 conv to dim channels) and ``to_out_linear`` (numqkv tokens -> 1).
    Both maps are linear, so they are applied in the other order: the tokens are reduced
    first, which is exact and numqkv times cheaper. The projections run as one matrix
    product over their stacked weights (``prepare``); the weights stay separate parameters
    so the state dict has one key per projection.
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

    def prepare(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the attention derives from its weights alone: the stacked projection and the
        output bias. Computed by each ``forward`` without them, or once per sampling run.

        The stacked projection (h·3·n·d, dim) has its rows ordered (head, q|k|v, projection,
        channel), so that a product viewed as (B·h, 3, n, d) holds each head's q, k and v as
        contiguous blocks (batched matrix products without copies). The output bias is to_out's
        bias carried through to_out_linear plus its own."""
        n, heads, dim_head = self.numqkv, ATTN_HEADS, ATTN_DIM_HEAD
        # Channels of projection i are [q | k | v], each head-major (h d).
        per_head = [proj.weight.view(3, heads, dim_head, -1).transpose(0, 1) for proj in self.to_qkv]
        weight = torch.stack(per_head, dim=2)  # (h, 3, n, d, dim)
        w = self.to_out_linear.weight  # (1, n)
        bias = self.to_out.bias * w.sum() + self.to_out_linear.bias  # (dim,)
        return weight.view(heads * 3 * n * dim_head, -1), bias

    def forward(
        self, x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, dim) -> (B, dim); ``prepared``: ``prepare()`` computed beforehand, or None."""
        batch = x.shape[0]
        n, heads, dim_head = self.numqkv, ATTN_HEADS, ATTN_DIM_HEAD
        weight, bias = self.prepare() if prepared is None else prepared
        q, k, v = project(x, weight).view(batch * heads, 3, n, dim_head).unbind(1)  # 3 × (B·h, n, d)
        # Transposed scores, keys along dim 1 (softmax over a non-last dim is the faster kernel
        # for 16 keys): attn_t[j, i] = softmax over j of q_i·k_j/√d, the scale applied inside
        # the product (alpha; beta=0 ignores the zero it is given as input).
        scores_t = torch.baddbmm(k.new_zeros(()), k, q.transpose(1, 2), beta=0, alpha=dim_head**-0.5)
        attn_t = scores_t.float().softmax(dim=1)  # (B·h, n_k, n_q), in float32
        # to_out_linear first: Σ_i w_i·(attn @ v)_i = (w @ attn) @ v, one token per head.
        w = self.to_out_linear.weight.view(n)
        mixed = torch.matmul(like_weight(attn_t, w), w)  # (B·h, n_k) = w @ attn
        out = torch.bmm(mixed.unsqueeze(1), v)  # (B·h, 1, d)
        # then to_out, head-major as it expects; its bias was carried through in `bias`
        return linear(out.view(batch, heads * dim_head), self.to_out.weight.squeeze(2), bias)  # (B, dim)


def attention_block(dim: int, numqkv: int) -> Residual:
    """Residual(PreNorm(Attention)), the attention unit used throughout the U-Net."""
    return Residual(PreNorm(dim, Attention(dim, numqkv)))


class Resample(nn.Sequential):
    """Down/Upsample: Linear(a, a) -> SiLU -> Linear(a, b) on (B, a) features."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(nn.Linear(dim_in, dim_in), nn.SiLU(), nn.Linear(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three layers as functions (one module call instead of four)."""
        first, _, second = self
        return linear(F.silu(linear(x, first.weight, first.bias)), second.weight, second.bias)


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

    def resnet_blocks(self) -> list[ResnetBlock]:
        """The ResnetBlocks in the order the U-Net applies them."""
        downs = [block for level in self.downs for block in level[:2]]
        ups = [block for level in self.ups for block in level[1:3]]
        return [*downs, self.mid_block1, self.mid_block2, *ups, self.finals[0][0]]

    def attentions(self) -> list[Attention]:
        """The Attention modules in the order the U-Net applies them."""
        units = [level[2] for level in self.downs] + [self.mid_attn]
        units += [level[3] for level in self.ups] + [self.finals[0][1]]
        return [unit.fn.fn for unit in units]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, D), t (B,) integer steps, context (B, C) -> predicted noise (B, D)."""
        batch = x.shape[0]
        self._check(x, context)
        if t.shape != (batch,):
            raise ValueError(f"Denoiser: t must be ({batch},), got {tuple(t.shape)}")
        cond = torch.cat([self.time_mlp(t), context], dim=1)  # (B, 512 + C)
        modulations = [block.modulation(block.mlp(cond)) for block in self.resnet_blocks()]
        return self.unet(x, modulations, itertools.repeat(None))  # each attention prepares its own weights

    def sampler(
        self,
        context: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        compiled: bool = False,
        timesteps: Sequence[int] = (),
    ) -> DenoiserSampler:
        """The fast ε̂(x, t) of one sampling run with this (B, C) context (see DenoiserSampler)."""
        return DenoiserSampler(self, context, dtype, compiled, timesteps)

    def unet(
        self,
        x: torch.Tensor,
        modulations: Sequence[torch.Tensor],
        prepared: Iterable[tuple[torch.Tensor, torch.Tensor] | None],
    ) -> torch.Tensor:
        """The U-Net walk: x (B, D) -> ε̂ (B, D), given each ResnetBlock's modulation
        (``ResnetBlock.modulation``) and each Attention's ``prepare()`` (None: prepared
        there), in the order of ``resnet_blocks()`` and ``attentions()``."""
        modulation, qkv = iter(modulations), iter(prepared)
        x = pointwise(self.init_conv, x)  # (B, D)
        r = x
        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, next(modulation))
            skips.append(x)
            x = attn(block2(x, next(modulation)), next(qkv))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block1(x, next(modulation))
        x = self.mid_block2(self.mid_attn(x, next(qkv)), next(modulation))

        for upsample, block1, block2, attn in self.ups:
            x = upsample(x)
            x = block1(torch.cat([x, skips.pop()], dim=1), next(modulation))
            x = block2(torch.cat([x, skips.pop()], dim=1), next(modulation))
            x = attn(x, next(qkv))

        final_block, final_attn, final_conv = self.finals[0]
        x = final_block(torch.cat([x, r], dim=1), next(modulation))  # (B, D)
        return pointwise(final_conv, final_attn(x, next(qkv)))  # (B, D)

    def _check(self, x: torch.Tensor, context: torch.Tensor) -> None:
        batch = x.shape[0]
        if x.shape != (batch, self.flame_dim):
            raise ValueError(f"Denoiser: x must be (B, {self.flame_dim}), got {tuple(x.shape)}")
        if context.shape != (batch, self.context_dim):
            raise ValueError(
                f"Denoiser: context must be ({batch}, {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )


def step_of(t: torch.Tensor) -> int:
    """The one step of a (B,) batch of steps, read back to the host (a sync on a GPU): for callers
    that hold the steps as a tensor. Samplers pass the step as an int (``at_step``) instead."""
    if t.ndim != 1 or not bool((t == t[0]).all()):
        raise ValueError(f"DenoiserSampler: all rows must be at the same step, got steps {sorted(set(t.tolist()))}")
    return int(t[0])


def product_copy(net: Denoiser, dtype: torch.dtype) -> Denoiser:
    """``net`` for a sampler's U-Net walk in ``dtype``: its 1×1 convolutions and linear layers
    hold their weights and biases in ``dtype``, cast here once; the norms' parameters stay
    float32. The parameters a sampler takes from ``net`` itself instead (attention projections,
    time_mlp, the ResnetBlocks' mlp) are shared with it, not copied."""
    shared = [*net.time_mlp.parameters()]
    shared += [p for attention in net.attentions() for p in attention.to_qkv.parameters()]
    shared += [p for block in net.resnet_blocks() for p in block.mlp.parameters()]
    low = copy.deepcopy(net, {id(p): p for p in shared})
    kept = {id(p) for p in shared}
    for module in low.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)) and id(module.weight) not in kept:
            module.to(dtype)
    return low


class DenoiserSampler:
    """ε̂(x, t) of one sampling run, the context fixed: the Denoiser's fast inference path.

    Equal to ``net(x, t, context)`` (up to float rounding) when all rows share one step t, as
    in sampling. Built once per run from the network's own weights, it holds every
    Attention's ``prepare()`` and the context half of every ResnetBlock modulation:
    mlp([τ, c]) = W_τ·SiLU(τ) + W_c·SiLU(c) + b (SiLU is elementwise), so W_c·SiLU(c) + b
    (with the modulation's offset) is computed here (``set_context`` replaces it in place),
    and W_τ·SiLU(τ) once per step for all rows, in float32. With ``dtype`` bfloat16 the
    products run in bfloat16 on weights cast here once (``product_copy``, the stacked
    projections), the norms and the softmax in float32; ε̂ is float32. With ``compiled`` each
    call runs ``eps`` as compiled by torch.compile (``compiled_eps``). Given the run's
    ``timesteps`` (the steps the sampler will call it at; eager path only), the time half of
    those steps is computed here too, in one product, and calls at other steps are refused.
    """

    def __init__(
        self,
        net: Denoiser,
        context: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        compiled: bool = False,
        timesteps: Sequence[int] = (),
    ) -> None:
        if compiled and timesteps:
            raise ValueError("DenoiserSampler: timesteps are prepared for the eager path only, not with compiled")
        self.net, self.dtype, self.compiled = net, dtype, compiled
        self.walk = net if dtype == torch.float32 else product_copy(net, dtype)  # the U-Net the calls walk
        blocks = net.resnet_blocks()
        linears = [block.mlp[1] for block in blocks]
        self.sizes = [linear.out_features for linear in linears]
        with torch.no_grad():
            # each mlp weight is (2·dim_out, 512 + C): its time columns, then its context columns
            self.time_weight = torch.cat([linear.weight[:, :TIME_DIM] for linear in linears])  # (S, 512)
            self.context_weight = torch.cat([linear.weight[:, TIME_DIM:] for linear in linears])  # (S, C)
            self.bias = torch.cat([block.modulation(linear.bias) for block, linear in zip(blocks, linears)])  # (S,)
            self.context_part = F.linear(F.silu(context), self.context_weight, self.bias)  # (B, S)
            # inductor cannot take a packed (oneDNN) weight as an input: the compiled path keeps F.linear's
            self.attentions = [
                (stacked.to(dtype) if compiled else pack_projection(stacked.to(dtype), context.shape[0]),
                 out_bias.to(dtype))
                for stacked, out_bias in (attention.prepare() for attention in net.attentions())
            ]
            steps = sorted(set(timesteps))
            if steps:
                table = self.time_part(torch.tensor(steps, dtype=torch.long, device=context.device))  # (K, S)
        self.time_parts = {t: table[i : i + 1] for i, t in enumerate(steps)}  # step -> (1, S)
        if self.time_parts:  # prepared for its steps: the time weights are no longer needed
            self.time_weight = None

    def set_context(self, context: torch.Tensor) -> None:
        """Sample with another context of the same shape: its half of the modulations is
        written into the tensor the calls read (and a captured CUDA graph replays)."""
        if context.shape != (self.context_part.shape[0], self.context_weight.shape[1]):
            raise ValueError(f"DenoiserSampler: context {tuple(context.shape)} must be "
                             f"{(self.context_part.shape[0], self.context_weight.shape[1])}")
        with torch.no_grad():
            self.context_part.copy_(F.linear(F.silu(context), self.context_weight, self.bias))

    def time_part(self, t: torch.Tensor) -> torch.Tensor:
        """The time half of the modulation, W_τ·SiLU(τ(t)): t (K,) steps -> (K, S), float32."""
        return F.linear(F.silu(self.net.time_mlp(t)), self.time_weight)

    def eps(self, x: torch.Tensor, t: torch.Tensor, time_part: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D), t (1,) the step of every row -> ε̂ (B, D) float32; ``time_part``: that
        step's ``time_part`` (1, S) if computed beforehand. No host sync, no Python branch on
        values, every tensor made on x's device: capturable as a CUDA graph."""
        with torch.no_grad():
            if time_part is None:
                time_part = self.time_part(t)  # (1, S), shared by all rows
            modulation = self.context_part + time_part  # (B, S)
            out = self.walk.unet(x, modulation.split(self.sizes, dim=1), self.attentions)
        return out.float()

    def at_step(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """x (B, D), every row at ``step`` -> ε̂ (B, D): the samplers' call. The step comes as a
        Python int, so nothing is read back from the device."""
        if x.shape[0] != self.context_part.shape[0]:
            raise ValueError(f"DenoiserSampler: x {tuple(x.shape)} must have {self.context_part.shape[0]} rows "
                             "(the context's)")
        if not self.time_parts:
            return self.step(x, torch.full((1,), step, dtype=torch.long, device=x.device))
        if step not in self.time_parts:
            raise ValueError(
                f"DenoiserSampler: prepared for steps {min(self.time_parts)}…{max(self.time_parts)} "
                f"({len(self.time_parts)} steps), called at step {step}"
            )
        return self.eps(x, None, self.time_parts[step])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, D), t (B,) with one value -> ε̂ (B, D), for callers holding the steps as a
        tensor (``step_of`` reads it back)."""
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"DenoiserSampler: x {tuple(x.shape)} and t {tuple(t.shape)} must have as many rows")
        return self.at_step(x, step_of(t))

    def step(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps`` (x (B, D), t (1,)), compiled when the sampler was built with ``compiled``
        (a sampler built without ``timesteps``)."""
        return (compiled_eps() if self.compiled else DenoiserSampler.eps)(self, x, t)


@functools.cache
def compiled_eps() -> Callable[[DenoiserSampler, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``DenoiserSampler.eps`` compiled by torch.compile (inductor), made once per process.

    Inductor fuses the many small elementwise operations of one call; the first call of each
    network and batch size compiles (tens of seconds on a CPU, kept in inductor's on-disk
    cache), later samplers of the same network reuse the compiled code.
    """
    return torch.compile(DenoiserSampler.eps, dynamic=False)


class StaticEps:
    """An eps_fn that runs ``step(x, t)`` over static input buffers (x (B, D), t (1,)).

    Each call copies x and the step into the buffers and returns a copy of the output. On
    CUDA with ``cuda_graph`` the step is captured once as a CUDA graph and replayed (one
    launch per network call instead of hundreds); elsewhere it runs eagerly on the buffers,
    the same code path. Warm-up, capture and replay run with ``device`` as the current CUDA
    device, whichever device is current outside. ``capture_seconds``: what the warm-up and
    capture took (0 without a graph).
    """

    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        device: torch.device,
        cuda_graph: bool = False,
    ) -> None:
        self.step, self.device = step, torch.device(device)
        self.x = torch.zeros(shape, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0
        if cuda_graph and self.device.type == "cuda":
            start = time.perf_counter()
            with torch.cuda.device(self.device):
                self.graph, self.out = capture(step, self.x, self.t)
            self.capture_seconds = time.perf_counter() - start
            log.info("denoiser step for %d rows captured as a CUDA graph on %s in %.2f s",
                     shape[0], self.device, self.capture_seconds)

    def at_step(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """ε̂ (B, D) of x (B, D) at ``step`` (a Python int: no read-back)."""
        self.x.copy_(x)
        self.t.fill_(step)
        if self.graph is None:
            return self.step(self.x, self.t)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.out.clone()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """For callers holding the steps as a (B,) tensor (``step_of`` reads it back)."""
        return self.at_step(x, step_of(t))


def capture(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``step(x, t)`` captured as a CUDA graph on the current device after three warm-up calls on
    a side stream, as PyTorch prescribes; returns the graph and its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(x, t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x, t)
    return graph, out
