"""Few-step ODE solvers from diffusers, set up on our noise schedule (SPEC §5).

- ``dpmpp_2m``: DPM-Solver++ (Lu et al. 2022), second-order multistep, data prediction.
- ``unipc``: UniPC (Zhao et al. 2023), the bh2 predictor-corrector of order 2; its
  corrector reuses the next step's network output, so it costs no extra call.

Both are deterministic and call the network once per step. Visits use diffusers' "linspace"
spacing, t_j = round(j·(T−1)/steps) for j = steps…1: the first visit is T−1, the level x_T
is drawn at (as our ``ddim``), there are exactly ``steps`` distinct visits, and each is
within 2 of ``ddim``'s ⌊j·T/steps⌋ − 1 (999, 899, …, 100 for 10 steps against 999, …, 99).
Not "trailing", though it equals ``ddim``'s visits when ``steps`` divides T: diffusers
0.42 builds it with a float ``arange`` that for some counts (61, 103, 121, …) yields
steps + 1 visits, the last at t = −1. Not "leading": it starts far below T−1 and would
denoise x_T as if it were less noisy than it is. The last update lands on the clean
level (σ = 0).

The scheduler takes the schedule's own β (``trained_betas``), so it runs on exactly the
levels the model was trained with, whatever they were built from; for our linear schedule
these equal diffusers' ``beta_schedule="linear"`` bit for bit (a test checks this).
diffusers is imported on first use: it takes seconds to import and the other samplers do
not need it.
"""

from __future__ import annotations

import warnings
from typing import Any

from ofer.diffusion.schedule import NoiseSchedule

SOLVERS = ("dpmpp_2m", "unipc")
DEFAULT_SOLVER_STEPS = 10


def solver_scheduler(sampler: str, schedule: NoiseSchedule, steps: int | None) -> Any:
    """A fresh diffusers scheduler for ``sampler`` with its ``steps`` timesteps set (cheap: no network).

    Its timesteps and σ tables stay on the CPU (diffusers keeps σ there "to avoid too much
    CPU/GPU communication"), and β comes from ``schedule.host_betas``, so that setting it up,
    listing its visits and its first ``step`` (which finds its place in the timesteps with
    ``nonzero``) read nothing back from a GPU.

    Args:
        sampler: ``"dpmpp_2m"`` or ``"unipc"``.
        schedule: the noise schedule the model was trained with.
        steps: number of network calls, in [1, T−1]; None for ``DEFAULT_SOLVER_STEPS``.
    Returns:
        The scheduler, exposing ``timesteps`` and ``step(eps, t, x).prev_sample``.
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    steps = DEFAULT_SOLVER_STEPS if steps is None else steps
    if not 1 <= steps < schedule.num_steps:  # T steps would round two visits onto one t
        raise ValueError(f"{sampler}: steps must be in [1, {schedule.num_steps - 1}], got {steps}")
    common = {
        "num_train_timesteps": schedule.num_steps,
        "trained_betas": schedule.host_betas,
        "prediction_type": "epsilon",
        "solver_order": 2,
        "timestep_spacing": "linspace",
        "final_sigmas_type": "zero",
    }
    if sampler == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
    else:
        raise ValueError(f"solver_scheduler: sampler must be one of {SOLVERS}, got {sampler!r}")
    with warnings.catch_warnings():  # diffusers 0.42 calls np.array on a tensor the numpy-2 way numpy warns about
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps, device="cpu")
    return scheduler


def solver_visits(scheduler: Any) -> list[int]:
    """The steps a ``solver_scheduler`` visits, in order (read from the CPU: no device sync)."""
    return scheduler.timesteps.tolist()
