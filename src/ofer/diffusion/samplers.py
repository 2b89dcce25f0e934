"""Reverse-diffusion samplers: DDPM, strided DDIM, the original DDIM sequence (SPEC §5), and
the few-step solvers DPM-Solver++ and UniPC (``ofer.diffusion.solvers``).

All samplers start from x_T ~ N(0, I) and call ``eps_fn(x (B, D), t (B,) long)`` once per
visited step; the caller binds the conditioning (context repeated per sample), so N samples
for each of B images are drawn in one batched call of shape (B·N, D). An eps_fn with an
``at_step(x, step)`` method (``StepEps``: the denoiser's fast path, ``StaticEps``) is called
there with the step as a Python int instead: the samplers know their steps, so nothing is
read back from the device per call. Every random draw uses ``generator``, so a seeded
generator makes sampling reproducible.

- ``ddpm``: ancestral sampling over all T steps with the posterior variance
  σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t) and no noise at t = 0.
- ``ddim``: DDIM (Song et al. 2021) over ``steps`` steps t_i = ⌊(i+1)·T/steps⌋ − 1
  ("trailing" spacing: the first visit is T−1, the level x_T is drawn at), the last update
  going to ᾱ = 1; ``eta`` scales the DDIM σ (0: deterministic, 1 with steps = T: DDPM).
- ``ddim_legacy``: the original sequence, for exact reproduction. It visits
  t = T−1, T−5, …, 3, −1 and from each visit moves to the noise level of t−1 (not of the
  next visit) with η = 0. At t = −1 the tables are indexed from the end as Python does
  (ᾱ[−1] for t, ᾱ[−2] for t−1), a near no-op, and the network receives t = −1, as in the
  original.
- ``dpmpp_2m``, ``unipc``: diffusers' multistep ODE solvers on our schedule, ``steps``
  network calls (default 10), deterministic; see ``ofer.diffusion.solvers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ofer.diffusion.noise import Generators, randn
from ofer.diffusion.schedule import NoiseSchedule
from ofer.diffusion.solvers import SOLVERS, solver_scheduler, solver_visits
from ofer.progress import progress as progress_bar

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class StepEps(Protocol):
    """A noise predictor that takes the one step of all rows as a Python int."""

    def at_step(self, x: torch.Tensor, step: int) -> torch.Tensor: ...

SAMPLERS = ("ddpm", "ddim", "ddim_legacy", *SOLVERS)
FIXED_SEQUENCE = ("ddpm", "ddim_legacy")  # samplers whose network calls are fixed: no step count
DEFAULT_DDIM_STEPS = 50
LEGACY_STRIDE = 4  # the original visits every 4th step


def ddim_timesteps(num_steps: int, steps: int) -> list[int]:
    """Descending DDIM steps t_i = ⌊(i+1)·T/steps⌋ − 1, i = steps−1…0 (T−1 first)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"ddim: steps must be in [1, {num_steps}], got {steps}")
    return [(i + 1) * num_steps // steps - 1 for i in reversed(range(steps))]


def legacy_timesteps(num_steps: int = 1000) -> list[int]:
    """The original DDIM visiting order: T−1, T−5, …, down to the last value > 0, then −1.

    For T = 1000: 999, 995, …, 3, −1 (251 visits).
    """
    return list(range(num_steps - 1, 0, -LEGACY_STRIDE)) + [-1]


def ddpm_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t + σ_t·z, σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t).

    Scalars are 0-dim tensors; ``noise`` z of x's shape, or None for the noiseless last step.
    """
    mean = (x - beta / (1.0 - alpha_bar).sqrt() * eps) / alpha.sqrt()
    if noise is None:
        return mean
    variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    return mean + variance.sqrt() * noise


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Move x from noise level ᾱ to ᾱ_prev (DDIM):  x0̂ = (x − √(1−ᾱ)·ε̂)/√ᾱ,
    x' = √ᾱ_prev·x0̂ + √(1−ᾱ_prev−σ²)·ε̂ + σ·z,  σ = η·√((1−ᾱ_prev)/(1−ᾱ))·√(1−ᾱ/ᾱ_prev).

    Scalars are 0-dim tensors; ``noise`` z of x's shape, or None to drop σ·z (η = 0, or
    the last step where ᾱ_prev = 1 and σ = 0).
    """
    x0 = (x - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    sigma = (
        eta
        * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)).sqrt()
    )
    # clamp: rounding may push 1 − ᾱ_prev − σ² a hair below 0 when ᾱ_prev → 1
    direction = (1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0).sqrt() * eps
    x = alpha_bar_prev.sqrt() * x0 + direction
    return x if noise is None else x + sigma * noise


def _visits(sampler: str, num_steps: int, steps: int | None) -> list[tuple[int, int | None]]:
    """(t visited, index of the target noise level) pairs; target None means ᾱ = 1 (clean)."""
    if sampler == "ddpm":
        return [(t, t - 1 if t > 0 else None) for t in reversed(range(num_steps))]
    if sampler == "ddim":
        ts = ddim_timesteps(num_steps, DEFAULT_DDIM_STEPS if steps is None else steps)
        return list(zip(ts, ts[1:] + [None], strict=True))
    # ddim_legacy: target t−1, negative indices taken from the end of the tables on purpose.
    return [(t, t - 1) for t in legacy_timesteps(num_steps)]


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: sampler must be one of {SAMPLERS}, got {sampler!r}")


def _check_arguments(sampler: str, steps: int | None, eta: float) -> None:
    _check_sampler(sampler)
    if sampler in FIXED_SEQUENCE and steps is not None:
        raise ValueError(f"sample: a step count applies to ddim, {', '.join(SOLVERS)} only, not to {sampler} "
                         "(a fixed sequence)")
    if sampler != "ddim" and eta != 0.0:
        raise ValueError(f"sample: eta applies to 'ddim' only, not {sampler!r}")
    if eta < 0.0:
        raise ValueError(f"sample: eta must be >= 0, got {eta}")


def check_sampling(sampler: str, schedule: NoiseSchedule, steps: int | None = None, eta: float = 0.0) -> None:
    """Raise the ValueError ``sample`` would raise for these settings with this schedule (sampler
    name, a step count only where one applies and within the schedule, eta for ``ddim`` only),
    so that a run can refuse them before its first sample."""
    _check_arguments(sampler, steps, eta)
    network_steps(sampler, schedule, steps)  # each sampler's own rule for its step count


def network_steps(sampler: str, schedule: NoiseSchedule, steps: int | None = None) -> list[int]:
    """The steps t at which ``sample`` calls the network, in calling order (for
    ``Denoiser.sampler`` to prepare them)."""
    _check_sampler(sampler)
    if sampler in SOLVERS:
        return solver_visits(solver_scheduler(sampler, schedule, steps))
    return [t for t, _ in _visits(sampler, schedule.num_steps, steps)]


def _predict_noise(eps_fn: EpsFn | StepEps, x: torch.Tensor, t: int) -> torch.Tensor:
    """ε̂ = eps_fn(x, t) for every row of x at the one step t, shape-checked."""
    if isinstance(eps_fn, StepEps):
        eps = eps_fn.at_step(x, t)
    else:
        eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    if eps.shape != x.shape:
        raise ValueError(f"sample: eps_fn returned shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    return eps


def _solve(
    eps_fn: EpsFn, x: torch.Tensor, sampler: str, schedule: NoiseSchedule, steps: int | None, progress: bool
) -> torch.Tensor:
    """Run a diffusers multistep solver from x_T: one network call and one update per visit."""
    scheduler = solver_scheduler(sampler, schedule, steps)
    visits = solver_visits(scheduler)
    for t in progress_bar(visits, desc=sampler, disable=not progress):
        x = scheduler.step(_predict_noise(eps_fn, x, t), t, x).prev_sample
    return x


@torch.no_grad()
def sample(
    eps_fn: EpsFn | StepEps,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw x0 samples by running the reverse diffusion from x_T ~ N(0, I) (without autograd).

    Args:
        eps_fn: noise predictor, (x (B, D), t (B,) long) -> ε̂ (B, D), or a ``StepEps``.
        schedule: the noise schedule the model was trained with.
        shape: (B, D) output shape (B = images × samples per image).
        sampler: one of ``SAMPLERS``.
        steps: number of network calls for ``ddim`` (default 50), ``dpmpp_2m`` and
            ``unipc`` (default 10); the other samplers have a fixed sequence.
        eta: DDIM stochasticity (``ddim`` only).
        generator: source of x_T and of the per-step noise, or one generator per image
            (``ofer.diffusion.noise``); a generator draws on its own device, and what it
            drew moves to ``device`` (a CPU generator gives the same noise on every device).
        device: where to sample; defaults to the schedule's device.
        progress: show a tqdm progress bar.
    Returns:
        Samples of ``shape`` (float32).
    """
    _check_arguments(sampler, steps, eta)
    device = schedule.betas.device if device is None else torch.device(device)
    betas = schedule.betas.to(device)
    alphas = schedule.alphas.to(device)
    alphas_cumprod = schedule.alphas_cumprod.to(device)
    clean = torch.ones((), device=device)  # ᾱ of the data level
    stochastic = sampler == "ddpm" or eta > 0.0

    x = randn(shape, generator, device)  # x_T
    if sampler in SOLVERS:
        return _solve(eps_fn, x, sampler, schedule, steps, progress)
    visits = _visits(sampler, schedule.num_steps, steps)
    for t, target in progress_bar(visits, desc=sampler, disable=not progress):
        eps = _predict_noise(eps_fn, x, t)
        alpha_bar_prev = clean if target is None else alphas_cumprod[target]
        noise = None
        if stochastic and target is not None:
            noise = randn(shape, generator, device)
        if sampler == "ddpm":
            x = ddpm_step(x, eps, betas[t], alphas[t], alphas_cumprod[t], alpha_bar_prev, noise)
        else:
            x = ddim_step(x, eps, alphas_cumprod[t], alpha_bar_prev, eta, noise)
    return x
