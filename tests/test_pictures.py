"""Tests for ofer.inference.pictures: where the overlay puts the mesh, and the two pictures' layout."""

import numpy as np
import trimesh

from ofer.inference.pictures import OVERLAY_LABELS, VIEW_DISTANCE_MM, overlay_picture, place_on_crop, samples_sheet
from ofer.inference.pipeline import Reconstruction
from ofer.preprocess import ARCFACE_TEMPLATE, arcface_input, five_keypoints, similarity_transform, transform_points


def _head_mm():
    """A head-sized ellipsoid (mm, FLAME frame) with a nose, and 68 landmarks whose 5 keypoints are on it."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    unit = np.asarray(sphere.vertices)
    bump = 0.4 * np.exp(-np.sum((unit - [0, 0, 1]) ** 2, axis=1) / 0.05)
    vertices = unit * [80.0, 110.0, 90.0] * (1 + bump[:, None])
    kpt68 = np.zeros((68, 3))
    kpt68[36:42] = [-32.0, 30.0, 70.0]  # image-left eye (the subject's right, FLAME -x)
    kpt68[42:48] = [32.0, 30.0, 70.0]
    kpt68[30] = [0.0, 0.0, 120.0]  # nose tip
    kpt68[48], kpt68[54] = [-25.0, -40.0, 72.0], [25.0, -40.0, 72.0]
    return vertices, np.asarray(sphere.faces), kpt68


def _reconstruction(vertices, kpt68, expressions):
    return Reconstruction(shapes=np.zeros((1, 300)), scores=np.zeros(1), best=0,
                          expressions=np.zeros((len(expressions), 50)), jaws=np.zeros((len(expressions), 3)),
                          neutral_mm=vertices, expression_mm=np.asarray(expressions), kpt68_mm=kpt68,
                          kpt7_mm=kpt68[:7], shape_spread_mm=np.zeros(len(vertices)),
                          expression_spread_mm=np.zeros(len(vertices)))


def test_place_on_crop_is_a_frontal_perspective_view_moved_by_the_alignment_similarity():
    vertices, _, kpt68 = _head_mm()
    kpt5 = five_keypoints(kpt68)
    template = ARCFACE_TEMPLATE * 3 + 1
    screen = place_on_crop(vertices, kpt5, template)
    # The pinhole view from the distance: x = X / (d - z), y = -Y / (d - z) (image y down).
    depth = VIEW_DISTANCE_MM - vertices[:, 2]
    pinhole = np.stack([vertices[:, 0] / depth, -vertices[:, 1] / depth], axis=1)
    kpt_depth = VIEW_DISTANCE_MM - kpt5[:, 2]
    similarity = similarity_transform(np.stack([kpt5[:, 0] / kpt_depth, -kpt5[:, 1] / kpt_depth], 1), template)
    np.testing.assert_allclose(screen[:, :2], transform_points(similarity, pinhole), atol=1e-9)
    # No shear or stretch: every distance in the view is scaled by the same factor.
    scale = np.linalg.norm(screen[1:, :2] - screen[0, :2], axis=1) / np.linalg.norm(pinhole[1:] - pinhole[0], axis=1)
    np.testing.assert_allclose(scale, scale[0], rtol=1e-9)
    assert np.argmax(screen[:, 2]) == np.argmax(vertices[:, 2])  # the nose is nearest
    top, left = np.argmax(vertices[:, 1]), np.argmax(vertices[:, 0])
    assert screen[top, 1] < template[:, 1].min() and screen[left, 0] > template[1, 0]  # head up, FLAME +x right


def test_place_on_crop_puts_the_keypoints_where_the_alignment_would():
    _, _, kpt68 = _head_mm()
    kpt5 = five_keypoints(kpt68)
    # A template that is itself a similarity image of the keypoints' view: they land on it exactly.
    view = place_on_crop(kpt5, kpt5, ARCFACE_TEMPLATE)[:, :2]
    angle = np.deg2rad(8.0)
    moved = 1.3 * view @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) + [4.0, -2.0]
    np.testing.assert_allclose(place_on_crop(kpt5, kpt5, moved)[:, :2], moved, atol=1e-9)


def test_overlay_has_two_labelled_panels_the_crop_and_the_mesh_over_it():
    vertices, faces, kpt68 = _head_mm()
    crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    picture = overlay_picture(arcface_input(crop), _reconstruction(vertices, kpt68, [vertices]), faces)
    pad, label = 4, 16  # image_grid's layout
    assert picture.shape == (pad + label + 336 + pad, pad + 2 * (336 + pad), 3)
    left = picture[pad + label : pad + label + 336, pad : pad + 336].astype(int)
    right = picture[pad + label : pad + label + 336, 2 * pad + 336 : 2 * pad + 672].astype(int)
    upscaled = np.repeat(np.repeat(crop, 3, 0), 3, 1).astype(int)
    assert np.abs(left - upscaled).max() <= 1  # the crop, 3x larger (through the ArcFace input's rounding)
    changed = np.abs(right - left).max(-1) > 2
    assert changed[150:230, 140:200].mean() > 0.9  # the mesh covers the face's centre (the template's nose)
    assert changed.mean() < 0.95 and not changed[0:3, 0:3].any()  # not the whole panel: the corners stay
    for i, text in enumerate(OVERLAY_LABELS):
        assert text and (picture[pad : pad + label, pad + i * (336 + pad) : (i + 1) * (336 + pad)] < 128).any()


def test_samples_sheet_shows_the_neutral_then_at_most_count_samples():
    vertices, faces, kpt68 = _head_mm()
    expressions = [vertices * [1.0, 1.0 + 0.05 * k, 1.0] for k in range(4)]
    rec = _reconstruction(vertices, kpt68, expressions)
    tile, pad, label = 160, 4, 16
    assert samples_sheet(rec, faces, 2).shape == (pad + tile + label + pad, pad + 3 * (tile + pad), 3)
    assert samples_sheet(rec, faces, 11).shape == (pad + tile + label + pad, pad + 5 * (tile + pad), 3)
