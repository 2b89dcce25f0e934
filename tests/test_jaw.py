"""Tests for ofer.flame.jaw (jaw limits) and its test.jaw_limits switch."""

import numpy as np
import pytest
import torch

from ofer.config import load_config
from ofer.flame.jaw import clamp_jaw, outside_limits

LIMITS = [-0.05, 0.3, -0.08, 0.08, -0.1, 0.02]


def test_clamp_moves_only_the_axes_outside_their_range():
    jaws = torch.tensor([[0.1, 0.0, 0.0], [0.9, -0.5, 0.05], [-0.2, 0.07, -0.3]])
    clamped = clamp_jaw(jaws, LIMITS)
    np.testing.assert_allclose(clamped.numpy(), [[0.1, 0.0, 0.0], [0.3, -0.08, 0.02], [-0.05, 0.07, -0.1]], atol=1e-7)
    assert clamped.dtype == jaws.dtype
    np.testing.assert_array_equal(outside_limits(jaws.numpy(), LIMITS), [False, True, True])
    assert not outside_limits(clamped.numpy(), LIMITS).any()
    batch = torch.randn(2, 5, 3)  # any leading shape
    assert clamp_jaw(batch, LIMITS).shape == (2, 5, 3)


@pytest.mark.parametrize("bad", [[0.0, 0.1], [0.3, -0.05, -0.08, 0.08, -0.1, 0.02], [0, float("nan"), 0, 1, 0, 1]])
def test_bad_limits_are_refused_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="x_lo, x_hi"):
        clamp_jaw(torch.zeros(1, 3), bad)


def test_the_switch_is_off_by_default_and_takes_six_numbers():
    assert load_config(None).test.jaw_limits is None  # as the original: samples used as drawn
    cfg = load_config(None, ["test.jaw_limits=[-0.05, 0.3, -0.08, 0.08, -0.08, 0.08]"])
    assert cfg.test.jaw_limits == [-0.05, 0.3, -0.08, 0.08, -0.08, 0.08]
