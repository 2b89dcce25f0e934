"""NoW evaluation: exact point-to-triangle distances, alignment, cropping, pooling, file layouts."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from ofer.eval import EXIT_COMPLETE, EXIT_MISSING, EXIT_SETUP, exit_code
from ofer.eval.geometry import (
    MeshSurface,
    Similarity,
    point_triangle_distance,
    refine_dogleg,
    refine_similarity,
    rotation_jacobian,
    similarity_procrustes,
)
from ofer.eval.now import (
    UNIT_FACTORS,
    check_unit,
    crop_scan,
    main,
    pooled_statistics,
    read_landmarks,
    read_picked_points,
    read_scan_vertices,
    resolve_item,
    scan_to_mesh_distances,
)
from ofer.io import InputError, read_mesh, write_ply

# NoW landmark order: right eye outer/inner, left eye inner/outer, nose bottom, mouth corners
# (FLAME frame: x to the subject's left, y up, z out of the face).
LANDMARK_DIRECTIONS = np.array([
    [-0.45, 0.3, 1.0], [-0.15, 0.3, 1.0], [0.15, 0.3, 1.0], [0.45, 0.3, 1.0],
    [0.0, -0.1, 1.0], [-0.25, -0.4, 1.0], [0.25, -0.4, 1.0],
])


def bumpy_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth, asymmetric head-sized closed mesh (mm) and 7 landmark vertex indices."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.0)  # 642 vertices, 1280 faces
    unit = np.asarray(sphere.vertices)
    radial = 1.0 + 0.1 * np.sin(3 * unit[:, 0] + 1) * np.cos(2 * unit[:, 1]) + 0.05 * unit[:, 2] ** 2
    vertices = unit * radial[:, None] * np.array([70.0, 90.0, 80.0])
    directions = LANDMARK_DIRECTIONS / np.linalg.norm(LANDMARK_DIRECTIONS, axis=1, keepdims=True)
    landmark_idx = np.argmax(directions @ unit.T, axis=1)  # (7,) vertex nearest each direction
    return vertices, np.asarray(sphere.faces), landmark_idx


TRUE = Similarity(1.3, Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix(), np.array([10.0, -20.0, 5.0]))


def make_scan(transform: Similarity) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan = the head moved by `transform`, subdivided so its vertices also lie inside faces."""
    vertices, faces, landmark_idx = bumpy_head()
    scan_v, scan_f = trimesh.remesh.subdivide(transform.apply(vertices), faces)
    return scan_v, scan_f, transform.apply(vertices[landmark_idx])


# ----------------------------------------------------------------- point-to-triangle distance

TRIANGLE = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])


@pytest.mark.parametrize(
    "point, expected",
    [
        ((1.0, 1.0, 3.0), 3.0),  # above the interior: the height
        ((1.0, 1.0, -2.0), 2.0),  # below the interior
        ((2.0, -3.0, 4.0), 5.0),  # edge region of AB: to (2, 0, 0)
        ((3.0, 3.0, 1.0), np.sqrt(3.0)),  # edge region of BC: to (2, 2, 0)
        ((-3.0, -4.0, 0.0), 5.0),  # vertex region of A
        ((7.0, -4.0, 12.0), 13.0),  # vertex region of B: (3, -4, 12)
        ((-1.0, 9.0, 0.0), np.sqrt(26.0)),  # vertex region of C: (-1, 5, 0)
    ],
)
def test_point_triangle_distance_hand_cases(point, expected):
    assert point_triangle_distance(np.array([point]), TRIANGLE)[0] == pytest.approx(expected, abs=1e-12)


def test_point_triangle_distance_batched_and_degenerate():
    points = np.array([[1.0, 1.0, 3.0], [5.0, 1.0, 0.0]])
    triangles = np.stack([TRIANGLE, np.array([[0.0, 0, 0], [2, 0, 0], [4, 0, 0]])])  # 2nd is a segment
    np.testing.assert_allclose(point_triangle_distance(points, triangles), [3.0, np.sqrt(2.0)], atol=1e-12)


def test_trimesh_closest_points_match_exact_distance():
    rng = np.random.default_rng(0)
    vertices, faces, _ = bumpy_head()
    points = rng.normal(size=(200, 3)) * 90.0
    exact = np.min([point_triangle_distance(points, tri) for tri in vertices[faces]], axis=0)  # (200,)
    closest, distance, triangle = MeshSurface(vertices, faces).closest(points)
    np.testing.assert_allclose(distance, exact, atol=1e-9)
    # the returned point lies on the returned triangle and realises the distance
    np.testing.assert_allclose(point_triangle_distance(closest, vertices[faces[triangle]]), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(closest - points, axis=1), distance, atol=1e-9)


# ---------------------------------------------------------------------- Procrustes and crop


def test_similarity_procrustes_recovers_transform_and_reflection_rule():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(7, 3)) * 30
    fit = similarity_procrustes(source, TRUE.apply(source))
    assert fit.scale == pytest.approx(1.3)
    np.testing.assert_allclose(fit.rotation, TRUE.rotation, atol=1e-10)
    np.testing.assert_allclose(fit.translation, TRUE.translation, atol=1e-9)
    mirrored = source * np.array([-1.0, 1.0, 1.0])
    assert np.linalg.det(similarity_procrustes(source, mirrored, allow_reflection=True).rotation) == pytest.approx(-1)
    np.testing.assert_allclose(similarity_procrustes(source, mirrored, allow_reflection=True).apply(source), mirrored,
                               atol=1e-9)
    assert np.linalg.det(similarity_procrustes(source, mirrored).rotation) == pytest.approx(1)
    assert similarity_procrustes(source, TRUE.apply(source), with_scale=False).scale == 1.0


def test_crop_scan_uses_the_now_sphere():
    # bridge = (0, 0, 0), centre = L4 + 0.3 (bridge - L4) = (0, -21, 0), r = 1.4 (80 + 30) / 2 = 77
    landmarks = np.array([[-40.0, 0, 0], [-10, 0, 0], [10, 0, 0], [40, 0, 0], [0, -30, 0], [-20, -50, 5], [20, -50, 5]])
    points = np.array([[0, -21 + 76.9, 0], [0, -21 + 77.1, 0], [76.9, -21, 0], [0, -21, -77.1]])
    np.testing.assert_array_equal(crop_scan(points, landmarks), [True, False, True, False])


# ---------------------------------------------------------------------- the protocol


def test_exact_similarity_copy_scores_zero_and_metrical_sees_the_scale():
    rng = np.random.default_rng(2)
    vertices, faces, landmark_idx = bumpy_head()
    scan_v, _, scan_lmk = make_scan(TRUE)
    cropped = scan_v[crop_scan(scan_v, scan_lmk)]
    assert 200 < len(cropped) < len(scan_v) // 2  # a face-sized cap, not the whole head
    noisy_lmk = vertices[landmark_idx] + rng.normal(scale=2.0, size=(7, 3))  # imperfect initialisation
    result = scan_to_mesh_distances(vertices, faces, noisy_lmk, cropped, scan_lmk)
    assert np.median(result.distances) < 1e-4 and result.distances.max() < 1e-3
    assert result.transform.scale == pytest.approx(1.3, rel=1e-6)
    np.testing.assert_allclose(result.transform.rotation, TRUE.rotation, atol=1e-6)
    metrical = scan_to_mesh_distances(vertices, faces, noisy_lmk, cropped, scan_lmk, metrical=True)
    assert metrical.transform.scale == 1.0 and np.median(metrical.distances) > 1.0


def test_rigid_copy_scores_zero_on_the_metrical_track():
    vertices, faces, landmark_idx = bumpy_head()
    rigid = Similarity(1.0, TRUE.rotation, TRUE.translation)
    scan_v, _, scan_lmk = make_scan(rigid)
    cropped = scan_v[crop_scan(scan_v, scan_lmk)]
    result = scan_to_mesh_distances(vertices, faces, vertices[landmark_idx] + 1.0, cropped, scan_lmk, metrical=True)
    assert np.median(result.distances) < 1e-4


def test_offset_surface_metrical_reports_offset_non_metrical_absorbs_it():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=50.0)
    vertices, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    # every vertex moved 0.5 mm along its (radial) normal; its closest mesh point is the vertex itself
    scan = vertices * (50.5 / 50.0)
    landmarks = np.array([[-60.0, 0, 0], [-10, 0, 0], [10, 0, 0], [60, 0, 0], [0, -30, 0],
                          [-20, -40, 30], [20, -40, 30]])
    cropped = scan[crop_scan(scan, landmarks)]
    assert len(cropped) == len(scan)
    metrical = scan_to_mesh_distances(vertices, faces, landmarks, cropped, landmarks, metrical=True)
    np.testing.assert_allclose(metrical.distances, 0.5, atol=1e-6)
    # documented limit of the non-metrical track: a uniform offset of a sphere is a scale change
    free = scan_to_mesh_distances(vertices, faces, landmarks, cropped, landmarks)
    assert free.transform.scale == pytest.approx(1.01, rel=1e-6) and free.distances.max() < 1e-6


def test_statistics_are_pooled_over_all_vertices():
    small, large = np.zeros(3), np.full(7, 4.0)  # per-image medians 0 and 4 -> their mean would be 2
    stats = pooled_statistics([small, large])
    assert stats["median"] == 4.0 and stats["n_points"] == 10
    assert stats["mean"] == pytest.approx(2.8)  # 28 / 10, not (0 + 4) / 2
    assert stats["std"] == pytest.approx(np.sqrt(11.2 - 2.8**2))  # population std: E[x²] − E[x]²
    assert np.isnan(pooled_statistics([])["median"])


# ---------------------------------------------------------------------- files and layouts

PP_TEMPLATE = """<!DOCTYPE PickedPoints>
<PickedPoints>
 <DocumentData>
  <DataFileName name="natural_head_rotation.000001.obj"/>
  <templateName name=""/>
 </DocumentData>
{points}
</PickedPoints>
"""


def write_pp(path: Path, points: np.ndarray) -> None:
    rows = "\n".join(f' <point x="{float(x)!r}" y="{float(y)!r}" z="{float(z)!r}" active="1" name="{i}"/>'
                     for i, (x, y, z) in enumerate(points))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PP_TEMPLATE.format(points=rows))


def test_picked_points_and_landmark_files(tmp_path):
    points = np.arange(21, dtype=np.float64).reshape(7, 3) / 3.0
    write_pp(tmp_path / "a.pp", points)
    np.testing.assert_array_equal(read_picked_points(tmp_path / "a.pp"), points)
    np.testing.assert_array_equal(read_landmarks(tmp_path / "a.pp"), points)
    np.savetxt(tmp_path / "b.txt", points)
    np.testing.assert_allclose(read_landmarks(tmp_path / "b.txt"), points)
    write_pp(tmp_path / "six.pp", points[:6])
    with pytest.raises(InputError, match="six.pp"):
        read_landmarks(tmp_path / "six.pp")
    (tmp_path / "bad.pp").write_text("<PickedPoints><point x='1' y='2'/></PickedPoints>")
    with pytest.raises(InputError, match="bad.pp"):
        read_picked_points(tmp_path / "bad.pp")


def test_flat_layout_resolution(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for path in [pred / "a.ply", pred / "a_kpt7.npy", pred / "b.obj", pred / "b.ply", pred / "b" / "kpt7.npy",
                 gt / "a.obj", gt / "a.pp", gt / "b.ply", gt / "b_lmk7.npy", gt / "c.obj", gt / "c.pp"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    a, b, c = (resolve_item(n, pred, gt) for n in "abc")
    assert (a.pred_mesh, a.pred_landmarks, a.scan_landmarks) == (pred / "a.ply", pred / "a_kpt7.npy", gt / "a.pp")
    assert (b.pred_mesh, b.pred_landmarks, b.scan_mesh) == (pred / "b.obj", pred / "b" / "kpt7.npy", gt / "b.ply")
    assert c.pred_mesh is None and c.pred_landmarks is None
    with pytest.raises(InputError, match="'d'"):
        resolve_item("d", pred, gt)


def test_now_layout_end_to_end(tmp_path):
    """Two predictions of one subject in two challenges, one missing; JSON report and table."""
    vertices, faces, landmark_idx = bumpy_head()
    scan_v, scan_f, scan_lmk = make_scan(TRUE)
    subject = "FaMoS_180424_03335_TA"
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    (gt / "scans" / subject).mkdir(parents=True)
    trimesh.Trimesh(scan_v, scan_f, process=False).export(gt / "scans" / subject / "natural_head_rotation.000001.obj")
    write_pp(gt / "scans_lmks_onlypp" / subject / "natural_head_rotation.000001_picked_points.pp", scan_lmk)
    own_frame = Similarity(0.001, Rotation.from_rotvec([0.0, 0.4, 0.0]).as_matrix(), np.array([0.0, 0.0, 0.02]))
    for challenge, image, save in [("multiview_neutral", "IMG_0101", np.save), ("selfie", "IMG_0200", np.savetxt)]:
        folder = pred / subject / challenge
        write_ply(folder / f"{image}.ply", own_frame.apply(vertices), faces)  # metres, rotated: any frame works
        save(folder / f"{image}.{'npy' if save is np.save else 'txt'}", own_frame.apply(vertices[landmark_idx]))
    lines = [f"{subject}/multiview_neutral/IMG_0101.jpg", f"{subject}/selfie/IMG_0200.jpg",
             f"{subject}/multiview_occlusions/IMG_0300.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    report = main(["--pred", str(pred), "--gt", str(gt), "--list", str(tmp_path / "list.txt"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (report["n_images"], report["n_evaluated"], report["n_missing"]) == (3, 2, 1)
    assert report["missing"] == [f"{subject}/multiview_occlusions/IMG_0300"]
    assert set(report["by_group"]) == {"multiview_neutral", "selfie"}
    assert report["median"] < 1e-4
    assert report["per_image"][0]["scale"] == pytest.approx(1300.0, rel=1e-6)
    assert report["n_points"] == 2 * report["per_image"][0]["n_points"]


def test_now_layout_takes_the_first_scan_and_landmark_file_like_the_reference(tmp_path, caplog):
    gt = tmp_path / "gt"
    for path in (gt / "scans" / "S1" / "b_scan.obj", gt / "scans" / "S1" / "a_scan.obj",
                 gt / "scans" / "S1" / "a_scan.ply", gt / "scans_lmks_onlypp" / "S1" / "x.pp"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    item = resolve_item("S1/selfie/IMG_1.jpg", tmp_path / "pred", gt)
    assert (item.scan_mesh, item.scan_landmarks) == (gt / "scans" / "S1" / "a_scan.obj",
                                                     gt / "scans_lmks_onlypp" / "S1" / "x.pp")
    assert "2 files match '*.obj'; using a_scan.obj" in caplog.text
    with pytest.raises(InputError, match=r"S2: no scan matching '\*.obj'"):
        resolve_item("S2/selfie/IMG_1.jpg", tmp_path / "pred", gt)


def test_now_layout_reads_test_py_outputs(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for path in (gt / "scans" / "S1" / "s.obj", gt / "scans_lmks_onlypp" / "S1" / "s.pp",
                 pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.ply", pred / "S1" / "selfie" / "IMG_1" / "kpt7.npy"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.ply").rename(pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.obj")
    assert resolve_item("S1/selfie/IMG_1.jpg", pred, gt).pred_mesh == (  # test.py --mesh-format obj
        pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.obj")
    (pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.ply").touch()  # --mesh-format both: the .ply, as before
    item = resolve_item("S1/selfie/IMG_1.jpg", pred, gt)
    assert item.pred_mesh == pred / "shapesample" / "S1" / "selfie" / "IMG_1_0.ply"
    assert item.pred_landmarks == pred / "S1" / "selfie" / "IMG_1" / "kpt7.npy"
    (pred / "S1" / "selfie" / "IMG_1.obj").touch()  # a submission's own file comes first
    assert resolve_item("S1/selfie/IMG_1.jpg", pred, gt).pred_mesh == pred / "S1" / "selfie" / "IMG_1.obj"


def test_both_layouts_keep_every_dot_of_the_image_stem(tmp_path):
    """`IMG.1.jpg` -> `IMG.1.obj`, `IMG.1.npy` (not `IMG.obj`), in the NoW layout as in the flat one."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for path in (gt / "scans" / "S1" / "s.obj", gt / "scans_lmks_onlypp" / "S1" / "s.pp", gt / "IMG.1.obj",
                 gt / "IMG.1.pp", pred / "S1" / "selfie" / "IMG.1.obj", pred / "S1" / "selfie" / "IMG.1.npy",
                 pred / "IMG.1.obj", pred / "IMG.1.npy"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    now = resolve_item("S1/selfie/IMG.1.jpg", pred, gt)
    assert (now.pred_mesh, now.pred_landmarks) == (pred / "S1" / "selfie" / "IMG.1.obj",
                                                   pred / "S1" / "selfie" / "IMG.1.npy")
    flat = resolve_item("IMG.1", pred, gt)
    assert (flat.pred_mesh, flat.pred_landmarks) == (pred / "IMG.1.obj", pred / "IMG.1.npy")


# ------------------------------------------------------------- reference behaviour details


def test_rotation_jacobian_matches_finite_differences():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 3))
    for rotvec in (np.zeros(3), np.array([0.3, -0.5, 0.2]), np.array([2.5, 1.0, -0.3])):
        numeric = np.zeros((5, 3, 3))
        for j in range(3):
            step = np.eye(3)[j] * 1e-6
            plus = points @ Rotation.from_rotvec(rotvec + step).as_matrix().T
            minus = points @ Rotation.from_rotvec(rotvec - step).as_matrix().T
            numeric[:, :, j] = (plus - minus) / 2e-6
        np.testing.assert_allclose(rotation_jacobian(rotvec, points), numeric, atol=1e-8)


def _imperfect_prediction() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prediction that differs from the scan's shape (so the fit keeps a residual), roughly placed."""
    vertices, faces, landmark_idx = bumpy_head()
    unit = vertices / np.linalg.norm(vertices, axis=1, keepdims=True)
    deformed = vertices * (1.0 + 0.03 * np.cos(4 * unit[:, 1]))[:, None]
    placed = Similarity(1.25, Rotation.from_rotvec([0.32, -0.46, 0.17]).as_matrix(), np.array([12.0, -18.0, 3.0]))
    return placed.apply(deformed), faces, landmark_idx


def test_official_refinement_stops_at_the_first_step_gaining_under_1e_4():
    pred_vertices, faces, _ = _imperfect_prediction()
    scan_v, _, scan_lmk = make_scan(TRUE)
    cropped = scan_v[crop_scan(scan_v, scan_lmk)]
    surface = MeshSurface(pred_vertices, faces)
    official = refine_dogleg(surface, cropped)
    assert 2 <= official.iterations < 200
    # Deterministic: a run capped at k steps takes the official run's first k steps.
    energies = [float(np.sum(surface.closest(cropped)[1] ** 2))]
    for k in range(1, official.iterations + 1):
        energies.append(float(np.sum(refine_dogleg(surface, cropped, max_steps=k).distances ** 2)))
    gains = [(a - b) / a for a, b in pairwise(energies)]
    assert all(g >= 1e-4 for g in gains[:-1]) and gains[-1] < 1e-4
    assert energies[-1] == pytest.approx(float(np.sum(official.distances**2)), rel=1e-12)
    # Ours runs on further and ends no worse.
    converged = refine_similarity(surface, cropped)
    assert float(np.sum(converged.distances**2)) <= energies[-1] * (1 + 1e-9)


def test_metrical_unit_option_and_wrong_unit_error():
    vertices, faces, landmark_idx = bumpy_head()
    rigid = Similarity(1.0, TRUE.rotation, TRUE.translation)
    scan_v, _, scan_lmk = make_scan(rigid)
    cropped = scan_v[crop_scan(scan_v, scan_lmk)]
    lmk = vertices[landmark_idx] + 1.0
    in_mm = scan_to_mesh_distances(vertices, faces, lmk, cropped, scan_lmk, metrical=True)
    for unit, factor in (("cm", 10.0), ("m", 1000.0)):
        check_unit(lmk / factor, scan_lmk, unit, Path("p.npy"))
        other = scan_to_mesh_distances(vertices / factor, faces, lmk / factor, cropped, scan_lmk, metrical=True,
                                       unit_factor=UNIT_FACTORS[unit])
        assert np.median(other.distances) < 1e-4 and other.transform.scale == factor
    assert np.median(in_mm.distances) < 1e-4
    with pytest.raises(InputError, match=r"p.npy: read in mm, .* looks like it is in m: pass --unit m"):
        check_unit(lmk / 1000.0, scan_lmk, "mm", Path("p.npy"))
    with pytest.raises(InputError, match="looks like it is in mm: pass --unit mm"):
        check_unit(lmk, scan_lmk, "cm", Path("p.npy"))


def test_scan_obj_vertices_are_read_as_stored(tmp_path):
    """Texture coordinates, normals, a duplicate and an unused vertex: every `v` line is a vertex."""
    path = tmp_path / "scan.obj"
    path.write_text("# scan\nmtllib x.mtl\nv 0 0 0\nv 1 0 0 0.5 0.5 0.5\nv 0 1 0\nv 0 1 0\nv 9 9 9\n"
                    "vt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nvn 0 0 1\n"
                    "f 1/1/1 2/2/1 3/3/1\nf 1/4/1 3/1/1 4/2/1\n")
    np.testing.assert_array_equal(read_scan_vertices(path), [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [9, 9, 9]])
    (tmp_path / "bad.obj").write_text("v 1 2\n")
    with pytest.raises(InputError, match="bad.obj"):
        read_scan_vertices(tmp_path / "bad.obj")


def _flat_case(tmp_path: Path, pred_landmarks: np.ndarray | None = None) -> tuple[Path, Path, Path]:
    vertices, faces, landmark_idx = bumpy_head()
    scan_v, scan_f, scan_lmk = make_scan(TRUE)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    gt.mkdir(parents=True)
    trimesh.Trimesh(scan_v, scan_f, process=False).export(gt / "a.obj")
    write_pp(gt / "a.pp", scan_lmk)
    write_ply(pred / "a.ply", vertices, faces)
    np.save(pred / "a_kpt7.npy", vertices[landmark_idx][None] if pred_landmarks is None else pred_landmarks)
    (tmp_path / "list.txt").write_text("a\n")
    return pred, gt, tmp_path / "list.txt"


def test_landmarks_of_shape_1_7_3_and_alignment_check_files(tmp_path):
    pred, gt, list_file = _flat_case(tmp_path)  # landmarks saved as (1, 7, 3)
    check = tmp_path / "check"
    report = main(["--pred", str(pred), "--gt", str(gt), "--list", str(list_file), "--check-alignment", str(check)])
    assert report["n_evaluated"] == 1 and report["median"] < 1e-4 and not report["per_image"][0]["reflection"]
    aligned, _ = read_mesh(check / "a" / "aligned_prediction.ply")
    cropped = trimesh.load(check / "a" / "cropped_scan.ply", process=False).vertices  # a point cloud
    assert len(cropped) == report["n_points"]
    vertices, _, _ = bumpy_head()
    np.testing.assert_allclose(aligned, TRUE.apply(vertices), atol=1e-3)  # float32 file


def test_reflected_or_misordered_landmarks_are_warned_about(tmp_path, caplog):
    vertices, _, landmark_idx = bumpy_head()
    mirrored = vertices[landmark_idx] * np.array([-1.0, 1.0, 1.0])  # left and right swapped
    pred, gt, list_file = _flat_case(tmp_path / "mirror", mirrored)
    report = main(["--pred", str(pred), "--gt", str(gt), "--list", str(list_file)])
    assert report["per_image"][0]["reflection"] and "is a reflection" in caplog.text
    caplog.clear()
    shuffled = vertices[landmark_idx][[4, 0, 6, 2, 1, 5, 3]]
    pred, gt, list_file = _flat_case(tmp_path / "order", shuffled)
    report = main(["--pred", str(pred), "--gt", str(gt), "--list", str(list_file)])
    assert report["per_image"][0]["landmark_rms_mm"] > 10 and "mm RMS" in caplog.text


def test_command_exit_codes_say_complete_missing_or_bad_input(tmp_path, caplog):
    pred, gt, list_file = _flat_case(tmp_path)
    argv = ["--pred", str(pred), "--gt", str(gt), "--list", str(list_file)]
    assert exit_code(main, argv) == EXIT_COMPLETE
    for suffix in (".obj", ".pp"):  # b: a scan, but no prediction
        (gt / f"b{suffix}").write_bytes((gt / f"a{suffix}").read_bytes())
    list_file.write_text("a\nb\n")
    assert exit_code(main, argv) == EXIT_MISSING
    argv[3] = str(tmp_path / "no_gt")
    assert exit_code(main, argv) == EXIT_SETUP
    assert f"{tmp_path / 'no_gt'}: ground-truth folder (NoW's final_release_version, or a flat scan folder) " \
           "not found" in caplog.text


def test_scan_ply_vertices_are_read_as_stored(tmp_path):
    """PLY scans, ASCII and binary: the vertex element as stored, whatever faces and texture coordinates say."""
    expected = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [9, 9, 9]], dtype=np.float64)
    ascii_ply = tmp_path / "textured.ply"  # per-face texcoords split vertices 0 and 2 in mesh loaders; 4 is unused
    ascii_ply.write_text(
        "ply\nformat ascii 1.0\ncomment seams\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nelement face 2\nproperty list uchar int vertex_indices\nproperty list uchar float texcoord\n"
        "end_header\n0 0 0 255\n1 0 0 255\n0 1 0 255\n0 1 0 255\n9 9 9 255\n"
        "3 0 1 2 6 0 0 1 0 0 1\n3 0 2 3 6 0.5 0 1 1 0 0.5\n")
    np.testing.assert_array_equal(read_scan_vertices(ascii_ply), expected)
    for order, name in (("<", "binary_little_endian"), (">", "binary_big_endian")):
        table = np.zeros(5, dtype=[("nx", order + "f4"), ("x", order + "f8"), ("y", order + "f8"), ("z", order + "f8"),
                                   ("quality", order + "u2")])
        table["x"], table["y"], table["z"] = expected.T
        faces = np.zeros(1, dtype=[("n", "u1"), ("idx", order + "i4", (3,))])
        faces["n"], faces["idx"] = 3, [0, 1, 2]
        header = (f"ply\nformat {name} 1.0\nelement vertex 5\nproperty float nx\nproperty double x\nproperty double y\n"
                  "property double z\nproperty ushort quality\nelement face 1\nproperty list uchar int vertex_indices\n"
                  "end_header\n")
        path = tmp_path / f"{name}.ply"
        path.write_bytes(header.encode() + table.tobytes() + faces.tobytes())
        np.testing.assert_array_equal(read_scan_vertices(path), expected)
        path.write_bytes(header.encode() + table.tobytes()[:-3])
        with pytest.raises(InputError, match=f"{name}.ply: the PLY declares 5 vertices; the file is shorter"):
            read_scan_vertices(path)


def test_bad_scans_and_scan_landmarks_are_errors_naming_the_file(tmp_path):
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv 1 nan 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(InputError, match=r"nan.obj: 1 of 3 scan vertices are NaN or infinite \(the first is vertex 2\)"):
        read_scan_vertices(tmp_path / "nan.obj")
    (tmp_path / "short.obj").write_text("v 0 0 0\nv 1 2\n")
    with pytest.raises(InputError, match="short.obj, line 2: a vertex needs 3 coordinates"):
        read_scan_vertices(tmp_path / "short.obj")
    points = np.arange(21, dtype=np.float64).reshape(7, 3)
    points[2, 1] = np.nan
    write_pp(tmp_path / "nan.pp", points)
    with pytest.raises(InputError, match=r"nan.pp: landmarks: 1 of 21 values are NaN or infinite"):
        read_landmarks(tmp_path / "nan.pp")
    np.save(tmp_path / "same.npy", np.ones((7, 3)))
    with pytest.raises(InputError, match="same.npy: the 7 landmarks coincide"):
        read_landmarks(tmp_path / "same.npy")


def _write_prediction(pred: Path, vertices: np.ndarray, faces: np.ndarray, landmarks: np.ndarray) -> None:
    write_ply(pred / "a.ply", vertices, faces)
    np.save(pred / "a_kpt7.npy", landmarks)


def test_degenerate_predictions_are_refused_naming_the_file(tmp_path, caplog):
    """Not a face surface NoW can measure: exit 2 with one error naming the file, instead of a number."""
    pred, gt, list_file = _flat_case(tmp_path)
    vertices, faces, landmark_idx = bumpy_head()
    landmarks = vertices[landmark_idx]
    out_of_range, nan_vertex, flat = faces.copy(), vertices.copy(), vertices.copy()
    out_of_range[5, 1] = 10**6
    nan_vertex[3] = np.nan
    flat[:, 2] = flat[:, 0]  # every triangle in the plane x = z ...
    flat[:, 1] = 0.0  # ... and on one line: zero area
    cases = [
        ((vertices, out_of_range, landmarks), r"a.ply: face indices span 0..1000000, outside the 642 vertices"),
        ((vertices, faces, landmarks), None),  # control: evaluated
        ((nan_vertex, faces, landmarks), r"a.ply: vertices: 3 of 1926 values are NaN or infinite"),
        ((vertices, faces[:1], landmarks), r"a.ply: only 1 triangle\(s\) of non-zero area"),
        ((flat, faces, landmarks), r"a.ply: only 0 triangle\(s\) of non-zero area"),
        ((vertices * 1e30, faces, landmarks * 1e30), r"a.ply: the mesh is 2.82e\+32 across"),
        ((vertices / 1000, faces, landmarks), r"a_kpt7.npy: the outer eye corners \(L0, L3\) are .* times the size"),
    ]
    argv = ["--pred", str(pred), "--gt", str(gt), "--list", str(list_file)]
    for (v, f, lmk), message in cases:
        _write_prediction(pred, v, f, lmk)
        caplog.clear()
        if message is None:
            assert exit_code(main, argv) == EXIT_COMPLETE
            continue
        assert exit_code(main, argv) == EXIT_SETUP, message
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_refinement_keeps_the_scale_positive():
    """An icosahedron 1e30 times the size of its landmarks (refused by the command, measured here
    directly): the reference's penalised dogleg took the scale below zero and reported −2e15 mm."""
    vertices, _, landmark_idx = bumpy_head()
    scan_v, _, scan_lmk = make_scan(TRUE)
    cropped = scan_v[crop_scan(scan_v, scan_lmk)]
    icosahedron = trimesh.creation.icosphere(subdivisions=0, radius=80.0)
    result = scan_to_mesh_distances(np.asarray(icosahedron.vertices) * 1e30, np.asarray(icosahedron.faces),
                                    vertices[landmark_idx], cropped, scan_lmk)
    assert result.transform.scale > 0 and (result.distances >= 0).all()


def test_now_list_not_in_utf8_names_the_file_and_line(tmp_path, caplog):
    pred, gt, list_file = _flat_case(tmp_path)
    list_file.write_bytes(b"a\n# \xe9t\xe9\n")
    assert exit_code(main, ["--pred", str(pred), "--gt", str(gt), "--list", str(list_file)]) == EXIT_SETUP
    assert f"{list_file}, line 2: not UTF-8 text (byte 0xe9)" in caplog.text
