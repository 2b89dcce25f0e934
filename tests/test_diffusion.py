"""Tests of the noise schedule, the training loss and the samplers.

The samplers are driven by the exact noise predictor of Gaussian data x0 ~ N(μ, σ²I),
for which the distribution of each sampler's output is known in closed form, so sample
moments can be checked against an independent truth within the sampling error.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ofer.diffusion import (
    NoiseSchedule,
    ddim_timesteps,
    diffusion_loss,
    legacy_timesteps,
    sample,
)

T = 1000
MU, SIGMA = 1.5, 0.3
N_SAMPLES, DIM = 4000, 8


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule()


def alphas_cumprod64() -> np.ndarray:
    """ᾱ_t in float64, built independently of the module."""
    return np.cumprod(1.0 - np.linspace(1e-4, 1e-2, T))


def gaussian_eps(schedule: NoiseSchedule, mu: float = MU, sigma: float = SIGMA):
    """Optimal ε̂ for x0 ~ N(μ, σ²): √(1−ᾱ)(x − √ᾱ μ)/(ᾱσ² + 1 − ᾱ)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)

    return eps_fn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_moments(samples: torch.Tensor, mean: float, std: float, n_se: float = 5.0) -> None:
    """Sample mean and std within n_se standard errors of the expected values."""
    n = samples.numel()
    se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
    assert abs(samples.mean().item() - mean) < n_se * se_mean, (samples.mean().item(), mean)
    assert abs(samples.std().item() - std) < n_se * se_std, (samples.std().item(), std)


# ---------------------------------------------------------------- schedule and loss


def test_schedule_buffers(schedule: NoiseSchedule) -> None:
    assert set(schedule.state_dict()) == {"betas", "alphas", "alphas_cumprod"}
    for buffer in schedule.buffers():
        assert buffer.dtype == torch.float32 and buffer.shape == (T,)
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(1e-2)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), alphas_cumprod64(), rtol=2e-5)


def test_schedule_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="beta_1"):
        NoiseSchedule(beta_1=0.1, beta_T=0.01)
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule(num_steps=1)


def test_q_sample_formula(schedule: NoiseSchedule) -> None:
    x0 = torch.randn(3, 2, 4, generator=gen(0))
    noise = torch.randn(3, 2, 4, generator=gen(1))
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.shape == (3, 2, 4)
    ab = alphas_cumprod64()
    for i, step in enumerate(t.tolist()):
        expected = math.sqrt(ab[step]) * x0[i] + math.sqrt(1 - ab[step]) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise shape"):
        schedule.q_sample(x0, t, noise[:, :1])


def test_loss_is_zero_for_an_oracle(schedule: NoiseSchedule) -> None:
    x0 = torch.randn(64, 5, generator=gen(0))

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t][:, None]
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    for losstype in ("l1", "mse"):
        loss = diffusion_loss(oracle, schedule, x0, losstype, generator=gen(1))
        assert loss.shape == () and loss.item() < 1e-3


def test_loss_of_a_zero_predictor_and_step_range(schedule: NoiseSchedule) -> None:
    x0 = torch.randn(20000, 8, generator=gen(0))
    seen = []

    def zero(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x_t)

    # E|ε| = √(2/π) (std of |ε| 0.60, n = 160000); E[100 ε²] = 100 (std 141)
    l1 = diffusion_loss(zero, schedule, x0, "l1", generator=gen(1))
    mse = diffusion_loss(zero, schedule, x0, "mse", generator=gen(2))
    assert l1.item() == pytest.approx(math.sqrt(2 / math.pi), abs=0.01)
    assert mse.item() == pytest.approx(100.0, abs=2.0)
    t = torch.cat(seen)
    assert t.dtype == torch.long and t.min() == 0 and t.max() == T - 1
    with pytest.raises(ValueError, match="losstype"):
        diffusion_loss(zero, schedule, x0, "huber")


def test_loss_is_reproducible(schedule: NoiseSchedule) -> None:
    x0 = torch.randn(16, 4, generator=gen(0))
    model = torch.nn.Linear(4, 4)
    losses = [diffusion_loss(lambda x, t: model(x), schedule, x0, generator=gen(7)) for _ in "ab"]
    assert losses[0].item() == losses[1].item()


# ---------------------------------------------------------------- step sequences


def test_ddim_timesteps() -> None:
    ts = ddim_timesteps(T, 50)
    assert len(ts) == 50 and ts[0] == T - 1 and ts[-1] == 19
    assert all(a - b == 20 for a, b in itertools.pairwise(ts))
    assert ddim_timesteps(T, T) == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(T, T + 1)


def test_legacy_timesteps() -> None:
    ts = legacy_timesteps(T)
    assert ts == [999 - 4 * k for k in range(250)] + [-1]
    assert ts[:3] == [999, 995, 991] and ts[-2:] == [3, -1] and len(ts) == 251


def test_ddim_legacy_visits_the_original_steps(schedule: NoiseSchedule) -> None:
    seen = []

    def recorder(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (3,) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sample(recorder, schedule, (3, 2), sampler="ddim_legacy", generator=gen(0))
    assert seen == legacy_timesteps(T)


@pytest.mark.parametrize("sampler", ["ddim_legacy", "ddim"])
def test_zero_noise_prediction_rescales_x_T(schedule: NoiseSchedule, sampler: str) -> None:
    """With ε̂ ≡ 0 every DDIM move scales x by √(ᾱ_target/ᾱ_t), which pins the tables used.

    Legacy: each visit t targets t−1, so the factor is ∏ 1/√α_t, and at t = −1 the
    Python-indexed ᾱ[−2]/ᾱ[−1] = 1/α_{T−1}. Strided DDIM telescopes to 1/√ᾱ_{T−1}.
    """
    alphas = 1.0 - np.linspace(1e-4, 1e-2, T)
    if sampler == "ddim_legacy":
        factor = np.prod([1 / math.sqrt(alphas[t]) for t in legacy_timesteps(T)])
    else:
        factor = 1 / math.sqrt(alphas_cumprod64()[-1])
    inputs = []

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs.append(x.clone())
        return torch.zeros_like(x)

    out = sample(zero, schedule, (4, 3), sampler=sampler, generator=gen(0))
    torch.testing.assert_close(out, inputs[0] * factor, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- Gaussian data


def ddpm_output_moments(mu: float, sigma: float) -> tuple[float, float]:
    """Exact mean and std of DDPM output under the Gaussian oracle (float64 recursion).

    With ε̂ = c_t(x − √ᾱ_t μ) each step is affine in x plus independent noise, so the
    mean and variance of x propagate exactly from x_T ~ N(0, 1).
    """
    betas = np.linspace(1e-4, 1e-2, T)
    alphas, ab = 1 - betas, alphas_cumprod64()
    mean, var = 0.0, 1.0
    for t in reversed(range(T)):
        c = math.sqrt(1 - ab[t]) / (ab[t] * sigma**2 + 1 - ab[t])
        k = betas[t] / math.sqrt(1 - ab[t])
        a = (1 - k * c) / math.sqrt(alphas[t])
        b = k * c * math.sqrt(ab[t]) * mu / math.sqrt(alphas[t])
        noise_var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t]) if t > 0 else 0.0
        mean, var = a * mean + b, a * a * var + noise_var
    return mean, math.sqrt(var)


def ddim_output_moments(steps: int, mu: float, sigma: float) -> tuple[float, float]:
    """Exact mean and std of deterministic DDIM output under the Gaussian oracle.

    Standardise u_t = (x_t − √ᾱ_t μ)/s_t with s_t² = ᾱ_tσ² + 1 − ᾱ_t. A DDIM move from ᾱ
    to ᾱ' multiplies u by the cosine between (√ᾱ σ, √(1−ᾱ)) and (√ᾱ' σ, √(1−ᾱ')); the
    last target is the data (ᾱ' = 1, s = σ) and x_T ~ N(0, 1) gives u_T ~ N(−√ᾱ_T μ/s_T, 1/s_T²).
    """
    ab = alphas_cumprod64()
    levels = [ab[t] for t in ddim_timesteps(T, steps)] + [1.0]
    cosine = 1.0
    for a, a_next in itertools.pairwise(levels):
        dot = math.sqrt(a * a_next) * sigma**2 + math.sqrt((1 - a) * (1 - a_next))
        cosine *= dot / math.sqrt((a * sigma**2 + 1 - a) * (a_next * sigma**2 + 1 - a_next))
    s_T = math.sqrt(levels[0] * sigma**2 + 1 - levels[0])
    return mu - sigma * cosine * math.sqrt(levels[0]) * mu / s_T, sigma * cosine / s_T


def test_ddpm_samples_gaussian_data(schedule: NoiseSchedule) -> None:
    out = sample(gaussian_eps(schedule), schedule, (N_SAMPLES, DIM), "ddpm", generator=gen(3))
    mean, std = ddpm_output_moments(MU, SIGMA)
    # DDPM with the posterior variance recovers the data up to a small (~1 %) shrinkage
    assert mean == pytest.approx(MU, abs=0.005) and std == pytest.approx(SIGMA, rel=0.02)
    assert out.shape == (N_SAMPLES, DIM) and out.dtype == torch.float32
    assert_moments(out, mean, std)


@pytest.mark.parametrize("steps", [50, 250])
def test_ddim_samples_gaussian_data(schedule: NoiseSchedule, steps: int) -> None:
    out = sample(
        gaussian_eps(schedule), schedule, (N_SAMPLES, DIM), "ddim", steps=steps, generator=gen(4)
    )
    mean, std = ddim_output_moments(steps, MU, SIGMA)
    # deterministic DDIM keeps x_T's offset from the marginal at T (√ᾱ_T ≈ 0.08) and
    # shrinks the spread slightly with few steps; both vanish as the steps and T grow
    assert mean == pytest.approx(MU, abs=0.04) and std == pytest.approx(SIGMA, rel=0.07)
    assert_moments(out, mean, std)


def test_ddim_eta_one_over_all_steps_equals_ddpm(schedule: NoiseSchedule) -> None:
    eps_fn = gaussian_eps(schedule)
    ddpm = sample(eps_fn, schedule, (64, DIM), "ddpm", generator=gen(5))
    ddim = sample(eps_fn, schedule, (64, DIM), "ddim", steps=T, eta=1.0, generator=gen(5))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [{"sampler": "ddpm"}, {"sampler": "ddim", "steps": 20, "eta": 0.5}, {"sampler": "ddim"}],
)
def test_sampling_is_reproducible(schedule: NoiseSchedule, kwargs: dict) -> None:
    eps_fn = gaussian_eps(schedule)
    first = sample(eps_fn, schedule, (16, 4), generator=gen(11), **kwargs)
    again = sample(eps_fn, schedule, (16, 4), generator=gen(11), **kwargs)
    other = sample(eps_fn, schedule, (16, 4), generator=gen(12), **kwargs)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_sample_rejects_bad_arguments(schedule: NoiseSchedule) -> None:
    eps_fn = gaussian_eps(schedule)
    with pytest.raises(ValueError, match="sampler"):
        sample(eps_fn, schedule, (2, 3), sampler="euler")
    with pytest.raises(ValueError, match="a step count applies to ddim, dpmpp_2m, unipc only"):
        sample(eps_fn, schedule, (2, 3), sampler="ddpm", steps=50)
    with pytest.raises(ValueError, match="eta applies"):
        sample(eps_fn, schedule, (2, 3), sampler="ddim_legacy", eta=0.5)
    with pytest.raises(ValueError, match="eps_fn returned"):
        sample(lambda x, t: x[:, :1], schedule, (2, 3), sampler="ddim", steps=2)
