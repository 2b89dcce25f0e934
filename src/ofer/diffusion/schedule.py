"""The DDPM noise schedule and the denoising training loss (SPEC §5).

The schedule is linear in β (float32 ``torch.linspace``), α = 1 − β, ᾱ = cumprod(α).
It lives in an ``nn.Module`` with buffers ``betas``, ``alphas`` and ``alphas_cumprod`` so
that stages hold it as ``var_sched`` (the original checkpoint key); the buffers are fully
determined by (num_steps, beta_1, beta_T), so a loader may rebuild them instead of reading
the original ``var_sched.*`` entries, whose names we do not rely on.
The network never sees the schedule: samplers and the loss combine the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_TYPES = ("l1", "mse")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, …, 1) with ``ndim`` axes, to broadcast over a sample's coefficients."""
    return values.view(-1, *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """Linear-β variance schedule with T = ``num_steps`` steps indexed 0…T−1.

    Buffers (float32, shape (T,)): ``betas`` β_t, ``alphas`` α_t = 1 − β_t,
    ``alphas_cumprod`` ᾱ_t = ∏_{s≤t} α_s; ``host_betas``: β as a NumPy array.
    """

    def __init__(self, num_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 1e-2) -> None:
        super().__init__()
        if num_steps < 2:
            raise ValueError(f"NoiseSchedule: num_steps must be >= 2, got {num_steps}")
        if not 0.0 < beta_1 <= beta_T < 1.0:
            raise ValueError(
                "NoiseSchedule: need 0 < beta_1 <= beta_T < 1, "
                f"got beta_1={beta_1}, beta_T={beta_T}"
            )
        self.num_steps = num_steps
        betas = torch.linspace(beta_1, beta_T, num_steps, dtype=torch.float32)
        alphas = 1.0 - betas
        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, dim=0))
        # β on the host for diffusers' solvers, so that no sampling run reads the buffer back from
        # a GPU; kept equal to the buffer by a hook when a state dict is loaded
        self.host_betas = betas.numpy().copy()
        self.register_load_state_dict_post_hook(_keep_host_betas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.

        Args:
            x0: clean samples (B, …).
            t: steps (B,) long in [0, T).
            noise: ε, same shape as x0.
        Returns:
            x_t, same shape as x0.
        """
        if noise.shape != x0.shape:
            raise ValueError(
                f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}"
            )
        alpha_bar = _per_sample(self.alphas_cumprod[t], x0.dim())  # (B, 1, …)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def _keep_host_betas(schedule: NoiseSchedule, _incompatible: object) -> None:
    schedule.host_betas = schedule.betas.detach().cpu().numpy()


def diffusion_loss(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    losstype: str = "l1",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising loss of one batch: t ~ U{0…T−1}, ε ~ N(0, I), compare ε̂(x_t, t) with ε.

    Args:
        eps_model: maps (x_t (B, …), t (B,) long) to ε̂ of x_t's shape (context bound by
            the caller).
        schedule: the noise schedule.
        x0: clean targets (B, …), the raw coefficient vectors.
        losstype: ``"l1"`` mean |ε̂ − ε|, or ``"mse"`` 100·mean (ε̂ − ε)².
        generator: draws t and ε (reproducible training steps); on x0's device.
    Returns:
        Scalar loss.
    """
    if losstype not in LOSS_TYPES:
        raise ValueError(f"diffusion_loss: losstype must be one of {LOSS_TYPES}, got {losstype!r}")
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    eps = eps_model(schedule.q_sample(x0, t, noise), t)
    if losstype == "l1":
        return F.l1_loss(eps, noise)
    return 100.0 * F.mse_loss(eps, noise)
