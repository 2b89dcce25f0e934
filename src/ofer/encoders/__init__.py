"""Image encoders: ArcFace (identity) and FaRL (face appearance), real or tiny, and their inputs."""

from ofer.encoders.arcface import ArcFaceEncoder, IResNet, configure_single_image_bn, load_arcface_weights
from ofer.encoders.factory import build_arcface, build_farl
from ofer.encoders.farl import FarlEncoder, load_farl_state_dict, load_farl_weights
from ofer.encoders.normalise import CLIP_MEAN, CLIP_STD, arcface_normalise, clip_normalise
from ofer.encoders.tiny import TinyArcFace, TinyFarl

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ArcFaceEncoder",
    "FarlEncoder",
    "IResNet",
    "TinyArcFace",
    "TinyFarl",
    "arcface_normalise",
    "build_arcface",
    "build_farl",
    "clip_normalise",
    "configure_single_image_bn",
    "load_arcface_weights",
    "load_farl_state_dict",
    "load_farl_weights",
]
