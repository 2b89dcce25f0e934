"""Reading pretrained encoder weight files (ArcFace `backbone.pth`, FaRL `.pth`).

Both are plain `torch.save` files read with `torch.load(weights_only=True)`, so no code from the
file runs. Errors name the file and say what is wrong or where to get it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StateDictDiff:
    """How a state dict read from a file differs from the one a module expects."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key: file (shape) vs model (shape)"


def read_state_dict(path: str | Path, how_to_get: str) -> dict[str, torch.Tensor]:
    """Read a {name: tensor} dict from `path`, unwrapping a top-level 'state_dict' entry (FaRL).

    Args:
        path: the weight file.
        how_to_get: appended to the FileNotFoundError message (where to download, where to put it).
    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file cannot be read safely or does not hold a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found at {path}: {how_to_get}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{path}: not readable with torch.load(weights_only=True): {error}") from error
    if isinstance(content, dict) and "state_dict" in content:
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(content).__name__}")
    return content


def compare_state_dicts(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> StateDictDiff:
    """List the keys of `expected` absent from `given`, the extra keys, and shape mismatches."""
    return StateDictDiff(
        missing=[k for k in expected if k not in given],
        unexpected=[k for k in given if k not in expected],
        mismatched=[
            f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in given.items()
            if k in expected and v.shape != expected[k].shape
        ],
    )
