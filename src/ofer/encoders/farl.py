"""FaRL image encoder: the OpenAI-CLIP ViT-B/16 image tower carrying FaRL's face weights.

The tower is built by open_clip from its `ViT-B-16-quickgelu` config (OpenAI's layout with
QuickGELU activations); only the image tower is kept. It is built from the config directly, not
by `open_clip.create_model`, which logs "Model initialized randomly" although FaRL's or a
checkpoint's weights are loaded right after. open_clip's VisionTransformer uses the
OpenAI key names (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer.resblocks.N.attn.in_proj_weight`, `ln_post`, `proj`), and the tower is stored under
the attribute `visual`, so this module's state dict has exactly the `visual.*` keys of an
OpenAI-format CLIP state dict such as the FaRL release file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ofer.encoders.normalise import FARL_SIZE, check_image_batch
from ofer.encoders.weights import compare_state_dicts, read_state_dict

logger = logging.getLogger(__name__)

FARL_WEIGHTS = "pretrained/FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
FARL_MODEL_NAME = "ViT-B-16-quickgelu"
VISUAL_PREFIX = "visual."


class FarlEncoder(nn.Module):
    """(B, 3, 224, 224) CLIP-normalised face crops -> (B, 512) FaRL features (not normalised).

    Built with random weights; load FaRL's with `load_farl_weights`. Building takes about 2 s
    on a CPU (86.2 M parameters).
    """

    def __init__(self) -> None:
        super().__init__()
        # Imported here: open_clip takes seconds to import and the tiny encoders never need it.
        import open_clip

        config = open_clip.get_model_config(FARL_MODEL_NAME)
        if config is None:
            raise RuntimeError(f"open_clip {open_clip.__version__} has no model config '{FARL_MODEL_NAME}'")
        self.visual = open_clip.CLIP(**config).visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, FARL_SIZE, type(self).__name__)
        return self.visual(x)


def load_farl_state_dict(module: FarlEncoder, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load the image tower of an OpenAI-format CLIP state dict into `module` in place.

    Keys outside `visual.` (the text tower, `logit_scale`, ...) are ignored; a bare image-tower
    state dict (keys like `conv1.weight`) is accepted too; unexpected
    `visual.` keys are logged as a warning. Missing image-tower keys or shape mismatches raise a
    ValueError naming `source` (the file the dict came from).
    """
    visual = {k: v for k, v in state_dict.items() if k.startswith(VISUAL_PREFIX)}
    if not visual and "conv1.weight" in state_dict:  # a bare image tower (no `visual.` prefix)
        visual = {VISUAL_PREFIX + k: v for k, v in state_dict.items()}
    diff = compare_state_dicts(module.state_dict(), visual)
    if diff.missing or diff.mismatched:
        raise ValueError(
            f"{source} does not hold a CLIP ViT-B/16 image tower in OpenAI key naming: "
            f"missing keys {diff.missing}, shape mismatches {diff.mismatched}"
        )
    if diff.unexpected:
        logger.warning("%s: ignoring unknown image-tower keys %s", source, diff.unexpected)
    module.load_state_dict({k: v for k, v in visual.items() if k not in diff.unexpected})


def load_farl_weights(module: FarlEncoder, path: str | Path = FARL_WEIGHTS) -> None:
    """Load FaRL's released weights (a dict whose 'state_dict' is an OpenAI-CLIP state dict).

    Read with `torch.load(weights_only=True)`; a bare OpenAI-format state dict also works.

    Raises:
        FileNotFoundError: `path` does not exist (the message says where to get the file).
        ValueError: the file is unreadable or lacks image-tower keys, or shapes differ.
    """
    state_dict = read_state_dict(
        path,
        f"download FaRL-Base-Patch16-LAIONFace20M-ep64.pth from the FaRL GitHub release "
        f"(https://github.com/FacePerceiver/FaRL, 'Releases') and put it at {path} "
        f"(default location {FARL_WEIGHTS})",
    )
    load_farl_state_dict(module, state_dict, str(path))
    logger.info("loaded FaRL weights from %s", path)
