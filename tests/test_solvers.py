"""Tests of the diffusers solvers (DPM-Solver++ 2M, UniPC) on our noise schedule.

Truths used: diffusers' own linear schedule and DDIM scheduler (which must agree with our
schedule and our ``ddim``), and the exact probability-flow ODE for Gaussian data
x0 ~ N(μ, σ²I): with the exact ε̂ every deterministic sampler is an affine map
x_T ↦ a·x_T + b, and the exact flow from level T−1 keeps the standardised
u = (x − √ᾱ μ)/s, s² = ᾱσ² + 1 − ᾱ, so a = σ/s_T and b = μ − σ√ᾱ_T μ/s_T.
"""

from __future__ import annotations

import itertools
import math
import typing

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ofer.config import SamplerName, load_config
from ofer.diffusion import NoiseSchedule, ddim_timesteps, sample
from ofer.diffusion.noise import randn
from ofer.diffusion.samplers import SAMPLERS
from ofer.diffusion.solvers import DEFAULT_SOLVER_STEPS, SOLVERS, solver_scheduler
from ofer.inference.cli import parse_args

T = 1000
MU, SIGMA = 1.5, 0.5


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_eps(schedule: NoiseSchedule, mu: float = MU, sigma: float = SIGMA):
    """Optimal ε̂ for x0 ~ N(μ, σ²): √(1−ᾱ)(x − √ᾱ μ)/(ᾱσ² + 1 − ᾱ)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)

    return eps_fn


def exact_flow(mu: float = MU, sigma: float = SIGMA) -> tuple[float, float]:
    """(a, b) of the exact probability-flow map x_T ↦ a·x_T + b (float64, own schedule)."""
    ab_T = np.cumprod(1.0 - np.linspace(1e-4, 1e-2, T))[-1]
    s_T = math.sqrt(ab_T * sigma**2 + 1 - ab_T)
    return sigma / s_T, mu - sigma * math.sqrt(ab_T) * mu / s_T


def affine_map(sampler: str, steps: int, schedule: NoiseSchedule) -> tuple[float, float]:
    """Fit (a, b) of the sampler's map from the x_T it drew (the map is affine: exact fit)."""
    out = sample(gaussian_eps(schedule), schedule, (64, 1), sampler, steps=steps, generator=gen(0))
    x_T = randn((64, 1), gen(0))
    a = ((out - out.mean()) * (x_T - x_T.mean())).sum() / ((x_T - x_T.mean()) ** 2).sum()
    b = (out - a * x_T).mean()
    torch.testing.assert_close(out, a * x_T + b, atol=1e-5, rtol=0)
    return a.item(), b.item()


# ---------------------------------------------------------------- same schedule, same DDIM


def test_diffusers_linear_schedule_is_ours(schedule: NoiseSchedule) -> None:
    linear = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=1e-2, beta_schedule="linear")
    assert torch.equal(linear.betas, schedule.betas)
    assert torch.equal(linear.alphas_cumprod, schedule.alphas_cumprod)
    for sampler in SOLVERS:
        assert torch.equal(solver_scheduler(sampler, schedule, 10).alphas_cumprod,
                           schedule.alphas_cumprod)


@pytest.mark.parametrize("steps", [10, 50])
def test_diffusers_ddim_reproduces_our_ddim(schedule: NoiseSchedule, steps: int) -> None:
    """diffusers' DDIM (our betas, trailing visits, η = 0, final level ᾱ = 1) = our ``ddim``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a nonlinear ε̂ that depends on t
        return net(torch.cat([x, t[:, None].float() / T], dim=1))

    ours = sample(eps_fn, schedule, (16, 6), "ddim", steps=steps, generator=gen(3))
    ddim = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=1e-2, beta_schedule="linear",
                         timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                         prediction_type="epsilon")
    ddim.set_timesteps(steps)
    assert ddim.timesteps.tolist() == ddim_timesteps(T, steps)
    x = randn((16, 6), gen(3))
    with torch.no_grad():
        for t in ddim.timesteps.tolist():
            x = ddim.step(eps_fn(x, torch.full((16,), t)), t, x, eta=0.0).prev_sample
    assert (x - ours).abs().max().item() < 1e-5


# ---------------------------------------------------------------- visits and arguments


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solver_visits(schedule: NoiseSchedule, sampler: str) -> None:
    """`steps` network calls, first at T−1, strictly descending, near ddim's visits."""
    seen: list[int] = []

    def recorder(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (3,) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    for steps in [1, 2, 5, 7, 10, 20, 61, 103, 999]:
        seen.clear()
        sample(recorder, schedule, (3, 2), sampler, steps=steps, generator=gen(0))
        assert len(seen) == steps and seen[0] == T - 1 and seen[-1] >= 0
        assert all(a > b for a, b in itertools.pairwise(seen))
        assert max(abs(a - b) for a, b in zip(seen, ddim_timesteps(T, steps))) <= 2
    calls = []
    sample(lambda x, t: calls.append(t) or torch.zeros_like(x), schedule, (3, 2), sampler)
    assert len(calls) == DEFAULT_SOLVER_STEPS


def test_solver_arguments(schedule: NoiseSchedule) -> None:
    eps_fn = gaussian_eps(schedule)
    assert set(SOLVERS) <= set(SAMPLERS)
    for steps in (0, T):
        with pytest.raises(ValueError, match="steps must be in"):
            sample(eps_fn, schedule, (2, 3), "unipc", steps=steps)
    with pytest.raises(ValueError, match="eta"):
        sample(eps_fn, schedule, (2, 3), "dpmpp_2m", steps=10, eta=0.5)
    with pytest.raises(ValueError, match="a step count applies to ddim, dpmpp_2m, unipc only"):
        sample(eps_fn, schedule, (2, 3), "ddpm", steps=10)
    with pytest.raises(ValueError, match="eps_fn returned"):
        sample(lambda x, t: x[:, :1], schedule, (2, 3), "dpmpp_2m", steps=2)


# ---------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solvers_converge_to_the_exact_flow(schedule: NoiseSchedule, sampler: str) -> None:
    """Second order: the scale error falls ~4x per doubling of steps; DDIM's only ~2x."""
    a_exact, b_exact = exact_flow()
    errors = {}
    for steps in (20, 40):
        a, b = affine_map(sampler, steps, schedule)
        errors[steps] = abs(a / a_exact - 1)
        assert abs(b - b_exact) < 0.005
    a_ddim, _ = affine_map("ddim", 20, schedule)
    assert errors[20] < 0.03 and errors[20] < abs(a_ddim / a_exact - 1) / 3
    assert errors[40] < 0.01 and errors[40] < errors[20] / 3


@pytest.mark.parametrize("sampler", SOLVERS)
@pytest.mark.parametrize("steps", [10, 20])
def test_solvers_sample_gaussian_data(schedule: NoiseSchedule, sampler: str, steps: int) -> None:
    a, b = exact_flow()
    mean, std = b, a  # exact flow of x_T ~ N(0, 1); ≈ (μ, σ) as ᾱ_T ≈ 0.007
    assert mean == pytest.approx(MU, abs=0.07) and std == pytest.approx(SIGMA, rel=0.01)
    out = sample(gaussian_eps(schedule), schedule, (4000, 8), sampler, steps=steps, generator=gen(4))
    # solver budget: ~11 % scale shrinkage at 10 steps, 2 % at 20, on top of ~0.4 % sampling error
    tolerance = 0.12 if steps == 10 else 0.03
    assert out.std().item() == pytest.approx(std, rel=tolerance)
    assert out.mean().item() == pytest.approx(mean, abs=0.01)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solver_sampling_is_reproducible_per_image(schedule: NoiseSchedule, sampler: str) -> None:
    eps_fn = gaussian_eps(schedule)
    first = sample(eps_fn, schedule, (8, 4), sampler, steps=5, generator=gen(11))
    assert torch.equal(first, sample(eps_fn, schedule, (8, 4), sampler, steps=5, generator=gen(11)))
    assert not torch.allclose(first, sample(eps_fn, schedule, (8, 4), sampler, steps=5, generator=gen(12)))
    # one generator per image: image 1's rows depend on its own seed only
    pair = sample(eps_fn, schedule, (8, 4), sampler, steps=5, generator=[gen(1), gen(2)])
    alone = sample(eps_fn, schedule, (4, 4), sampler, steps=5, generator=[gen(2)])
    torch.testing.assert_close(pair[4:], alone)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solvers_accept_an_eps_buffer_reused_across_calls(schedule: NoiseSchedule, sampler: str) -> None:
    """A network that writes ε̂ into one static buffer (a captured CUDA graph does) gives the same samples."""
    eps_fn = gaussian_eps(schedule)
    buffer = torch.empty(6, 4)

    def static_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return buffer.copy_(eps_fn(x, t))

    fresh = sample(eps_fn, schedule, (6, 4), sampler, steps=6, generator=gen(5))
    assert torch.equal(sample(static_eps, schedule, (6, 4), sampler, steps=6, generator=gen(5)), fresh)


# ---------------------------------------------------------------- selectable like the others


def test_solvers_are_selectable_in_configs_and_cli() -> None:
    assert typing.get_args(SamplerName) == SAMPLERS
    cfg = load_config(None, ["test.sampling=dpmpp_2m", "test.steps=10", "test.exp_sampling=unipc",
                             "test.exp_steps=5", "idrank.sampling=unipc", "idrank.steps=10"])
    assert (cfg.test.sampling, cfg.test.exp_sampling, cfg.idrank.sampling) == ("dpmpp_2m", "unipc", "unipc")
    args = parse_args(["--checkpoint1", "r", "--checkpoint2", "i", "--checkpoint3", "e", "--filename", "l",
                       "--sampler", "dpmpp_2m", "--steps", "10", "--exp-sampler", "unipc",
                       "--exp-steps", "5"])
    assert (args.sampler, args.steps, args.exp_sampler, args.exp_steps) == ("dpmpp_2m", 10, "unipc", 5)
