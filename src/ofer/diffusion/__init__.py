"""Diffusion core of IdGen and ExpGen: the 1-D U-Net denoiser, the noise schedule and the
training loss, and the DDPM / DDIM samplers (SPEC §4–§5)."""

from ofer.diffusion.denoiser import (
    Denoiser,
    is_projection_key,
    original_state_dict_keys,
)
from ofer.diffusion.samplers import SAMPLERS, ddim_timesteps, legacy_timesteps, sample
from ofer.diffusion.schedule import NoiseSchedule, diffusion_loss

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "NoiseSchedule",
    "ddim_timesteps",
    "diffusion_loss",
    "is_projection_key",
    "legacy_timesteps",
    "original_state_dict_keys",
    "sample",
]
