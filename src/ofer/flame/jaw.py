"""Limits on sampled FLAME jaw poses: which samples leave a range, and clamping them into it.

ExpGen samples the jaw as an axis-angle vector (3,) in radians (x opens the mouth, y and z
turn and tilt the jaw sideways). A sample far outside the range the model was trained on
twists the lower face into a shape no face has. The original code uses every sample as
drawn; `test.jaw_limits` (off by default) clamps each axis into a range before FLAME.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def jaw_limits_array(limits: Sequence[float]) -> np.ndarray:
    """[x_lo, x_hi, y_lo, y_hi, z_lo, z_hi] (radians) -> (3, 2) array, checked."""
    array = np.asarray(limits, dtype=np.float64)
    if array.shape != (6,) or not np.isfinite(array).all() or (array[0::2] > array[1::2]).any():
        raise ValueError(f"jaw limits must be 6 finite numbers [x_lo, x_hi, y_lo, y_hi, z_lo, z_hi] with lo <= hi, "
                         f"got {list(limits)}")
    return array.reshape(3, 2)


def clamp_jaw(jaws: torch.Tensor, limits: Sequence[float]) -> torch.Tensor:
    """Clamp each axis of (..., 3) axis-angle jaw poses into [lo, hi] (see `jaw_limits_array`)."""
    bounds = torch.as_tensor(jaw_limits_array(limits), dtype=jaws.dtype, device=jaws.device)  # (3, 2)
    return torch.maximum(torch.minimum(jaws, bounds[:, 1]), bounds[:, 0])


def jaws_to_pose(jaws: torch.Tensor, limits: Sequence[float] | None) -> torch.Tensor:
    """The jaw poses FLAME is given: `jaws` clamped into `limits` (`test.jaw_limits`), as sampled when None.

    test.py and the evaluations that pose its saved samples again (ofer.eval.synthetic_table,
    bench/synthetic_accuracy.py) all go through here, so they pose the same jaws.
    """
    return jaws if limits is None else clamp_jaw(jaws, limits)


def outside_limits(jaws: np.ndarray, limits: Sequence[float]) -> np.ndarray:
    """(..., 3) jaw poses -> (...,) bool: True where any axis leaves its range."""
    jaws = np.asarray(jaws)
    bounds = jaw_limits_array(limits).astype(jaws.dtype)  # as clamp_jaw: in the samples' precision
    return ((jaws < bounds[:, 0]) | (jaws > bounds[:, 1])).any(-1)
