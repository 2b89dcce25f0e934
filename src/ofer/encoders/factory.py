"""Build the image encoders from config: real (IResNet-100 / FaRL ViT-B/16) or tiny.

The one place that decides which encoder a stage gets and loads its pretrained weights.
"""

from __future__ import annotations

import logging

from torch import nn

from ofer.encoders.arcface import ArcFaceEncoder, load_arcface_weights
from ofer.encoders.farl import FarlEncoder, load_farl_weights
from ofer.encoders.tiny import TinyArcFace, TinyFarl

logger = logging.getLogger(__name__)


def build_arcface(tiny: bool, weights: str | None = None, with_freeze: str = "l4") -> nn.Module:
    """ArcFace encoder: (B, 3, 112, 112) in [-1, 1] -> (B, 512) L2-normalised.

    Args:
        tiny: build the small CPU stand-in (`TinyArcFace`, always fully trainable) instead of
            IResNet-100.
        weights: path of an insightface `backbone.pth`; None leaves the network randomly
            initialised (tests, or when a stage checkpoint supplies the weights later).
        with_freeze: "l4" | "l3" | "l2" | "none", see `ArcFaceEncoder`.
    Raises:
        ValueError: weights given for the tiny encoder, or an unknown `with_freeze`.
    """
    if tiny:
        _reject_tiny_weights("ArcFace", weights)
        return TinyArcFace()
    encoder = ArcFaceEncoder(with_freeze=with_freeze)
    if weights is None:
        logger.debug("ArcFace built without pretrained weights (a checkpoint supplies them, or it starts random)")
    else:
        load_arcface_weights(encoder, weights)
    return encoder


def build_farl(tiny: bool, weights: str | None = None) -> nn.Module:
    """FaRL encoder: (B, 3, 224, 224) CLIP-normalised -> (B, 512) features (not normalised).

    Args:
        tiny: build the small CPU stand-in (`TinyFarl`) instead of the ViT-B/16.
        weights: path of the FaRL `.pth`; None leaves the network randomly initialised.
    Raises:
        ValueError: weights given for the tiny encoder.
    """
    if tiny:
        _reject_tiny_weights("FaRL", weights)
        return TinyFarl()
    encoder = FarlEncoder()
    if weights is None:
        logger.debug("FaRL built without pretrained weights (a checkpoint supplies them, or it starts random)")
    else:
        load_farl_weights(encoder, weights)
    return encoder


def _reject_tiny_weights(name: str, weights: str | None) -> None:
    if weights is not None:
        raise ValueError(
            f"tiny {name} encoder has no pretrained weights, but weights={weights!r} was given; "
            f"set the weights to null or use the full encoder"
        )
