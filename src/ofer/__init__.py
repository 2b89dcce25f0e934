"""OFER: occluded face expression reconstruction with conditional diffusion over FLAME."""

__version__ = "0.1.0"
