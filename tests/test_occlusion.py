"""Tests for ofer.data.occlusion: the occluder lands only inside its mask, in both crops."""

import cv2
import numpy as np
import pytest

from conftest import REPO
from ofer.data.occlusion import (
    KINDS,
    OcclusionAugment,
    main,
    paste_occluder,
    preview,
)
from ofer.io import read_image, write_image
from ofer.preprocess import arcface_input, arcface_to_bgr

# A similarity map from the 224 crop to the 112 crop (scale 0.6, 10 degrees, shifted), as
# the ArcFace alignment of a real photo produces.
_ANGLE = np.deg2rad(10)
ARCFACE_MATRIX = np.array(
    [[0.6 * np.cos(_ANGLE), -0.6 * np.sin(_ANGLE), -5.0], [0.6 * np.sin(_ANGLE), 0.6 * np.cos(_ANGLE), -20.0]]
)


def _sample(seed=0):
    """A smooth random 224 crop and an ArcFace input holding other random values."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (14, 14, 3)).astype(np.float32)
    image = np.round(cv2.resize(coarse, (224, 224), interpolation=cv2.INTER_CUBIC).clip(0, 255)).astype(np.uint8)
    arcface = rng.uniform(-1, 1, (3, 112, 112)).astype(np.float32)
    return image, arcface


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("matrix", [None, ARCFACE_MATRIX], ids=["resized", "aligned"])
def test_occluder_changes_only_pixels_inside_its_mask(kind, matrix):
    image, arcface = _sample(1)
    image_in, arcface_in = image.copy(), arcface.copy()
    augment = OcclusionAugment(prob=1.0, kinds=(kind,))
    rng = np.random.default_rng(7)
    for _ in range(3):
        out224, out112, mask = augment(image, arcface, matrix, rng)
        assert out224.dtype == np.uint8 and out112.dtype == np.float32 and mask.dtype == bool
        assert mask.any()
        np.testing.assert_array_equal(out224[~mask], image[~mask])
        # Every changed 112 pixel lies where the warped 224 mask has some coverage.
        warp = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25]]) if matrix is None else matrix
        reach = cv2.warpAffine(mask.astype(np.float32), warp, (112, 112), flags=cv2.INTER_LINEAR) > 0
        changed112 = (out112 != arcface).any(0)
        assert changed112.any()
        assert not (changed112 & ~reach).any()
        np.testing.assert_array_equal(out112[:, ~reach], arcface[:, ~reach])
    np.testing.assert_array_equal(image, image_in)  # the inputs are not modified
    np.testing.assert_array_equal(arcface, arcface_in)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_area_and_position(kind):
    image, arcface = _sample(2)
    augment = OcclusionAugment(prob=1.0, min_area=0.1, max_area=0.2, kinds=(kind,))
    rng = np.random.default_rng(11)
    for _ in range(15):
        _, _, mask = augment(image, arcface, None, rng)
        assert 0.1 - 0.005 <= mask.mean() <= 0.2 + 0.005  # slack for rasterisation
        rows, cols = np.nonzero(mask)
        assert 0.25 * 224 <= rows.mean() <= 0.75 * 224 and 0.25 * 224 <= cols.mean() <= 0.75 * 224


def test_default_area_range_holds_for_every_kind():
    image, arcface = _sample(3)
    augment = OcclusionAugment(prob=1.0)
    rng = np.random.default_rng(5)
    fractions = np.array([augment(image, arcface, None, rng)[2].mean() for _ in range(60)])
    assert fractions.min() >= 0.05 - 0.005 and fractions.max() <= 0.35 + 0.005
    assert fractions.max() - fractions.min() > 0.15  # the areas do vary


def test_prob_zero_is_identity():
    image, arcface = _sample(4)
    out224, out112, mask = OcclusionAugment(prob=0.0)(image, arcface, ARCFACE_MATRIX, np.random.default_rng(0))
    np.testing.assert_array_equal(out224, image)
    np.testing.assert_array_equal(out112, arcface)
    assert mask.shape == (224, 224) and not mask.any()


def test_prob_sets_the_share_of_occluded_items():
    image, arcface = _sample(5)
    augment, rng = OcclusionAugment(prob=0.3), np.random.default_rng(9)
    share = np.mean([augment(image, arcface, None, rng)[2].any() for _ in range(200)])
    assert 0.2 < share < 0.4


def test_same_seed_same_output():
    image, arcface = _sample(6)
    augment = OcclusionAugment(prob=1.0)
    first = [augment(image, arcface, ARCFACE_MATRIX, np.random.default_rng(42)) for _ in range(2)]
    for a, b in zip(*first):
        np.testing.assert_array_equal(a, b)
    other = augment(image, arcface, ARCFACE_MATRIX, np.random.default_rng(43))
    assert not np.array_equal(other[2], first[0][2])


def test_paste_occluder_maps_the_mask_and_pins_the_colour_conventions():
    image, arcface = _sample(7)
    mask = np.zeros((224, 224), dtype=bool)
    mask[60:160, 40:120] = True
    layer = np.zeros((224, 224, 3), dtype=np.uint8)
    layer[...] = (200, 50, 10)  # BGR
    rgb = (np.array([10, 50, 200], dtype=np.float32) - 127.5) / 127.5

    # Half scale: 112 pixel (i, j) samples the 224 crop at (2i + 0.5, 2j + 0.5).
    out224, out112, mask112 = paste_occluder(image, arcface, None, mask, layer)
    expected = np.zeros((112, 112), dtype=bool)
    expected[30:80, 20:60] = True
    np.testing.assert_array_equal(mask112, expected)
    np.testing.assert_allclose(out112[:, expected], np.repeat(rgb[:, None], expected.sum(), 1))
    assert (out224[mask] == (200, 50, 10)).all()

    # x112 = 0.5 x224 - 20, y112 = 0.5 y224 - 10 samples whole 224 pixels: an exact map.
    shifted = np.array([[0.5, 0, -20.0], [0, 0.5, -10.0]])
    _, _, mask112 = paste_occluder(image, arcface, shifted, mask, layer)
    expected = np.zeros((112, 112), dtype=bool)
    expected[20:70, 0:40] = True
    np.testing.assert_array_equal(mask112, expected)


def test_occluded_crops_agree_with_each_other():
    """Without a matrix the 112 input shows the resized 224 crop, occluder included."""
    image, _ = _sample(8)
    arcface = arcface_input(cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA))
    augment, rng = OcclusionAugment(prob=1.0, kinds=("rectangle", "ellipse")), np.random.default_rng(1)
    for _ in range(5):
        out224, out112, mask = augment(image, arcface, None, rng)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8))[::2, ::2] > 0  # (112, 112)
        resized = cv2.resize(out224, (112, 112), interpolation=cv2.INTER_AREA)
        difference = np.abs(arcface_to_bgr(out112).astype(int) - resized)[inner]
        assert difference.mean() < 8  # a swapped channel order would be off by far more here


def test_bad_inputs_are_refused():
    image, arcface = _sample(0)
    augment, rng = OcclusionAugment(), np.random.default_rng(0)
    with pytest.raises(ValueError, match="image224"):
        augment(image[:100], arcface, None, rng)
    with pytest.raises(ValueError, match="arcface112"):
        augment(image, arcface.astype(np.float64), None, rng)
    with pytest.raises(ValueError, match="arcface_matrix"):
        augment(image, arcface, np.eye(3), rng)
    with pytest.raises(ValueError, match="kinds"):
        OcclusionAugment(kinds=("scarf",))
    with pytest.raises(ValueError, match="min_area"):
        OcclusionAugment(min_area=0.4, max_area=0.2)


def test_preview_and_command_line_write_a_sheet(tmp_path):
    image, _ = _sample(9)
    sheet = preview([image], tmp_path / "sheet.png", n=4, seed=1)
    assert sheet.shape == (4 + 16 + 224 + 4, 4 * (448 + 4) + 4, 3)
    np.testing.assert_array_equal(read_image(tmp_path / "sheet.png"), sheet)

    write_image(tmp_path / "faces" / "a.jpg", np.ascontiguousarray(image[:, 20:200]))  # not square
    main(["--images", str(tmp_path / "faces"), "--out", str(tmp_path / "cli.png"), "--n", "2"])
    assert read_image(tmp_path / "cli.png").shape == sheet[:, : 2 * 452 + 4].shape


def test_command_line_default_image(tmp_path):
    pytest.importorskip("skimage")
    main(["--out", str(tmp_path / "astronaut.png"), "--n", "4"])
    assert read_image(tmp_path / "astronaut.png").shape[0] == 4 + 16 + 224 + 4


def test_preview_of_a_configs_occlusion_settings(tmp_path, capsys):
    """`--cfg` draws the samples with the config's dataset.occlusion settings, as training does."""
    image, _ = _sample(9)
    write_image(tmp_path / "faces" / "a.png", image)
    cfg = str(REPO / "configs" / "demo" / "idgen.yml")
    common = ["--images", str(tmp_path / "faces"), "--n", "4", "--cfg", cfg]
    main([*common, "--out", str(tmp_path / "never.png"), "--opt", "dataset.occlusion.prob=0"])
    never = read_image(tmp_path / "never.png")
    plain = preview([image], tmp_path / "plain.png", n=4, augment=OcclusionAugment(prob=0.0))
    np.testing.assert_array_equal(never, plain)  # nothing occluded: every cell is the image itself
    np.testing.assert_array_equal(plain[20:244, 4:228], image)
    main([*common, "--out", str(tmp_path / "hands.png"), "--opt", "dataset.occlusion.prob=1",
          "--opt", "dataset.occlusion.kinds=[hand]"])
    assert "kinds hand" in capsys.readouterr().out
    assert not np.array_equal(read_image(tmp_path / "hands.png"), never)
    with pytest.raises(SystemExit) as code:
        main([*common, "--out", str(tmp_path / "bad.png"), "--opt", "dataset.occlusion.porb=1"])
    assert code.value.code == 2 and "dataset.occlusion.porb" in capsys.readouterr().err
