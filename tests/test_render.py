"""Tests for ofer.render: rasteriser, shading, cameras and contact sheets."""

import numpy as np
import pytest
import trimesh
from scipy.spatial import Delaunay

from ofer import render
from ofer.render import (
    flame_to_camera,
    image_grid,
    perspective_project,
    rasterize,
    render_mesh,
)


def _pixel_centres(height, width):
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)  # (H*W, 2) as (x, y)


def _sphere(radius=1.0, subdivisions=3):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


@pytest.mark.parametrize("seed", range(4))
def test_single_triangle_covers_the_pixels_inside_it(seed):
    rng = np.random.default_rng(seed)
    height, width = 30, 40
    corners = rng.uniform([-10, -8, 0], [50, 38, 1], size=(3, 3))  # may reach outside the image
    faces = np.array([[0, 1, 2]]) if seed % 2 else np.array([[0, 2, 1]])  # both windings
    face_index, depth, bary = rasterize(corners, faces, height, width)

    inside = Delaunay(corners[:, :2]).find_simplex(_pixel_centres(height, width)) >= 0
    np.testing.assert_array_equal(face_index.ravel() == 0, inside)
    assert (face_index[~inside.reshape(height, width)] == -1).all()
    assert np.isneginf(depth[face_index < 0]).all() and (bary[face_index < 0] == 0).all()


def test_zbuffer_keeps_the_nearer_triangle_in_either_order():
    near = np.array([[2.0, 2, 5], [30, 3, 5], [4, 25, 5]])
    far = np.array([[5.0, 5, 1], [35, 20, 1], [10, 28, 1]])
    for vertices, near_face in ((np.concatenate([near, far]), 0), (np.concatenate([far, near]), 1)):
        face_index, depth, _ = rasterize(vertices, np.array([[0, 1, 2], [3, 4, 5]]), 32, 40)
        centres = _pixel_centres(32, 40)
        in_near = (Delaunay(near[:, :2]).find_simplex(centres) >= 0).reshape(32, 40)
        in_far = (Delaunay(far[:, :2]).find_simplex(centres) >= 0).reshape(32, 40)
        both = in_near & in_far
        assert both.sum() > 20
        assert (face_index[both] == near_face).all()
        np.testing.assert_allclose(depth[both], 5.0)
        assert (face_index[in_far & ~in_near] == 1 - near_face).all()


def test_barycentrics_reproduce_pixel_positions_and_the_plane_depth():
    vertices = np.array([[3.2, 1.7, 0.3], [27.9, 6.1, -2.0], [9.4, 22.6, 4.1]])
    face_index, depth, bary = rasterize(vertices, np.array([[0, 1, 2]]), 25, 30)
    covered = face_index == 0
    rows, cols = np.nonzero(covered)
    np.testing.assert_allclose(bary[covered].sum(1), 1.0)
    assert (bary[covered] >= -1e-9).all()
    np.testing.assert_allclose(bary[covered] @ vertices[:, :2], np.stack([cols, rows], 1), atol=1e-9)
    # The plane z = a x + b y + c through the three corners.
    plane = np.linalg.solve(np.c_[vertices[:, :2], np.ones(3)], vertices[:, 2])
    np.testing.assert_allclose(depth[covered], plane[0] * cols + plane[1] * rows + plane[2], atol=1e-9)


def test_degenerate_offscreen_and_non_finite_triangles_draw_nothing():
    collinear = [[1.0, 1, 0], [8, 8, 0], [15, 15, 0]]
    offscreen = [[-20.0, -20, 0], [-5, -20, 0], [-20, -5, 0]]  # left of and above the image
    not_finite = [[np.nan, 2, 0], [9.0, 9, 0], [2, 9, 0]]
    vertices = np.array(collinear + offscreen + not_finite)
    face_index, _, _ = rasterize(vertices, np.arange(9).reshape(3, 3), 16, 16)
    assert (face_index == -1).all()
    with pytest.raises(ValueError, match="outside"):
        rasterize(vertices, np.array([[0, 1, 9]]), 16, 16)


def test_chunked_rasterisation_matches_one_pass(monkeypatch):
    vertices, faces = _sphere(radius=20.0, subdivisions=2)
    vertices = vertices + [24, 20, 0]
    big = np.array([[-50.0, -50, -30], [200, -50, -30], [-50, 200, -30]])  # behind, covers all
    vertices, faces = np.concatenate([vertices, big]), np.concatenate([faces, [[len(vertices) + i for i in range(3)]]])
    whole = rasterize(vertices, faces, 40, 48)
    monkeypatch.setattr(render, "_FRAGMENT_BUDGET", 37)
    chunked = rasterize(vertices, faces, 40, 48)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
    assert (whole[0] >= 0).all()  # nothing left uncovered
    assert (whole[0] == len(faces) - 1).any() and (whole[0] < len(faces) - 1).any()


def _brute_force_zbuffer(vertices, faces, height, width):
    """Per pixel centre: of the triangles containing it, the nearest; ties to the lower face."""
    face_index = np.full((height, width), -1)
    depth = np.full((height, width), -np.inf)
    for i, j in np.ndindex(height, width):
        for f, tri in enumerate(vertices[faces]):
            (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = tri
            area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
            if area == 0:
                continue
            w1 = ((j - x0) * (y2 - y0) - (x2 - x0) * (i - y0)) / area
            w2 = ((x1 - x0) * (i - y0) - (j - x0) * (y1 - y0)) / area
            w0 = 1 - w1 - w2
            if min(w0, w1, w2) >= -1e-9 and w0 * z0 + w1 * z1 + w2 * z2 > depth[i, j] + 1e-9:
                face_index[i, j], depth[i, j] = f, w0 * z0 + w1 * z1 + w2 * z2
    return face_index, depth


@pytest.mark.parametrize("budget", [1 << 20, 23])
def test_zbuffer_matches_a_brute_force_reference_on_crossing_triangles(monkeypatch, budget):
    rng = np.random.default_rng(7)
    vertices = rng.uniform([-3, -3, 0], [20, 17, 10], size=(36, 3))  # 12 large, crossing, random-depth triangles
    faces = np.arange(36).reshape(12, 3)
    monkeypatch.setattr(render, "_FRAGMENT_BUDGET", budget)  # also across chunks
    face_index, depth, bary = rasterize(vertices, faces, 15, 18)
    expected_index, expected_depth = _brute_force_zbuffer(vertices, faces, 15, 18)
    np.testing.assert_array_equal(face_index, expected_index)
    np.testing.assert_allclose(depth, expected_depth, atol=1e-9)
    covered = face_index >= 0
    np.testing.assert_allclose((bary[covered][:, :, None] * vertices[faces[face_index[covered]]]).sum(1)[:, 2],
                               depth[covered], atol=1e-9)


def test_equal_depth_goes_to_the_lower_face_in_any_chunking(monkeypatch):
    square = np.array([[0.0, 0, 3], [12, 0, 3], [12, 12, 3], [0, 12, 3]])
    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 2], [1, 2, 3]])  # faces 0 and 2 coincide, 3 overlaps both
    for budget in (1 << 20, 5):
        monkeypatch.setattr(render, "_FRAGMENT_BUDGET", budget)
        face_index, _, _ = rasterize(square, faces, 13, 13)
        drawn = set(np.unique(face_index).tolist())
        assert 2 not in drawn and 3 not in drawn and {0, 1} <= drawn


def test_lambert_shading_matches_the_analytic_sphere():
    radius, size = 40.0, 100
    vertices, faces = _sphere(subdivisions=4)
    screen = np.c_[size / 2 + radius * vertices[:, 0], size / 2 + radius * vertices[:, 1], radius * vertices[:, 2]]
    light = np.array([1.0, -0.5, 1.0])
    ambient, albedo = 0.2, np.array([0.9, 0.6, 0.3])
    image, mask = render_mesh(screen, faces, size, size, light_dir=light, albedo=albedo, ambient=ambient)

    rows, cols = np.mgrid[0:size, 0:size]
    dx, dy = (cols - size / 2) / radius, (rows - size / 2) / radius
    interior = dx**2 + dy**2 < 0.8**2
    normal = np.stack([dx, dy, np.sqrt(np.clip(1 - dx**2 - dy**2, 0, None))], -1)  # visible hemisphere
    lambert = np.clip(normal @ (light / np.linalg.norm(light)), 0, None)
    expected = (ambient + (1 - ambient) * lambert)[..., None] * albedo * 255
    assert mask[interior].all()
    assert np.abs(image[interior] - expected[interior]).max() < 6
    # Lit from the right and above: the upper right is brighter than the lower left.
    assert image[30, 70].mean() > image[70, 30].mean() + 50


def test_shading_ignores_winding_and_alpha_blends_over_the_background():
    vertices, faces = _sphere(radius=15.0, subdivisions=2)
    screen = vertices + [20, 20, 0]
    background = np.full((40, 40, 3), 200, dtype=np.uint8)
    opaque, mask = render_mesh(screen, faces, 40, 40)
    flipped, _ = render_mesh(screen, faces[:, ::-1], 40, 40)
    np.testing.assert_array_equal(opaque, flipped)
    half, half_mask = render_mesh(screen, faces, 40, 40, background=background, alpha=0.5)
    np.testing.assert_array_equal(mask, half_mask)
    assert (half[~mask] == 200).all() and (opaque[~mask] == 0).all()
    assert np.abs(half[mask].astype(int) - (opaque[mask] / 2 + 100)).max() <= 1
    per_vertex, _ = render_mesh(screen, faces, 40, 40, albedo=np.tile([0.8, 0.8, 0.8], (len(vertices), 1)))
    np.testing.assert_array_equal(per_vertex, opaque)


def test_perspective_project_known_points():
    points = np.array([[0.0, 0.0, 2.0], [1.0, -0.5, 2.0], [0.2, 0.4, 4.0]])
    screen = perspective_project(points, focal=100.0, cx=50.0, cy=40.0)
    np.testing.assert_allclose(screen[:, :2], [[50, 40], [100, 15], [55, 50]])
    np.testing.assert_allclose(np.exp(-screen[:, 2] / 100.0), points[:, 2])  # depth round trip
    assert screen[0, 2] > screen[2, 2]  # nearer is larger
    with pytest.raises(ValueError, match="in front of the camera"):
        perspective_project(np.array([[0.0, 0.0, -1.0]]), 100.0, 0.0, 0.0)


def _head():
    """A head-sized ellipsoid (metres) in the FLAME frame with a nose bump at +z."""
    unit, faces = _sphere(subdivisions=3)
    bump = 0.04 * np.exp(-np.sum((unit - [0, 0, 1]) ** 2, axis=1) / 0.05)
    vertices = unit * [0.08, 0.11, 0.09] + unit * bump[:, None]
    return vertices, faces


def test_frontal_flame_face_has_nose_nearest_and_head_up():
    vertices, faces = _head()
    cam = flame_to_camera(vertices, np.eye(3), np.array([0.0, 0.0, -0.6]))
    np.testing.assert_allclose(cam[:, 2], 0.6 - vertices[:, 2])
    screen = perspective_project(cam, focal=800.0, cx=64.0, cy=64.0)
    nose, top, chin, left = (
        np.argmax(vertices[:, 2]),
        np.argmax(vertices[:, 1]),
        np.argmin(vertices[:, 1]),
        np.argmax(vertices[:, 0]),
    )
    assert np.argmin(cam[:, 2]) == nose
    assert screen[top, 1] < 64 < screen[chin, 1]  # top of the head at the top of the image
    assert screen[left, 0] > 64  # the subject's left on the viewer's right

    _, depth, _ = rasterize(screen, faces, 128, 128)
    nearest = np.unravel_index(np.argmax(depth), depth.shape)
    assert np.hypot(nearest[1] - screen[nose, 0], nearest[0] - screen[nose, 1]) < 2.0


def test_flame_to_camera_applies_rotation_before_translation():
    vertices, _ = _head()
    yaw = np.deg2rad(30)
    rotation = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    cam = flame_to_camera(vertices, rotation, np.array([0.01, 0.02, -0.5]))
    expected = (rotation @ vertices.T).T + [0.01, 0.02, -0.5]
    np.testing.assert_allclose(cam, expected * [1, -1, -1])


def test_image_grid_layout_and_labels():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (10, 20, 3), dtype=np.uint8) for _ in range(5)]
    sheet = image_grid(images, ncols=2, pad=4)
    assert sheet.shape == (3 * 14 + 4, 2 * 24 + 4, 3)
    np.testing.assert_array_equal(sheet[4:14, 4:24], images[0])
    np.testing.assert_array_equal(sheet[18:28, 28:48], images[3])
    assert (sheet[32:42, 28:48] == 255).all()  # the empty sixth cell
    labelled = image_grid(images, ncols=3, labels=[f"sample {i}" for i in range(5)], pad=2)
    assert labelled.shape == (2 * (10 + 16 + 2) + 2, 3 * 22 + 2, 3)
    assert (labelled[2:18, 2:22] < 255).any()  # some text drawn above the first image
    with pytest.raises(ValueError, match="image 1"):
        image_grid([images[0], images[0][:5]], ncols=2)
