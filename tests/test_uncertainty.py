"""Per-vertex spread of the samples, its colour map, files and pictures."""

import json

import numpy as np
import pytest
import torch
import trimesh

from ofer.flame import FLAME
from ofer.inference.layout import UNCERTAINTY_FILES
from ofer.inference.pictures import scores_plot, spread_picture
from ofer.inference.uncertainty import (
    SPREAD_SCALE_MM,
    spread_colors,
    vertex_spread,
    write_uncertainty,
)
from ofer.io import read_mesh


def reconstructed(out) -> list[str]:
    return json.loads((out / "summary.json").read_text())["reconstructed"]


def numpy_spread(meshes: np.ndarray) -> np.ndarray:
    """The standard deviation of each vertex's position: sqrt of the summed per-coordinate variances."""
    return np.sqrt(np.var(np.asarray(meshes, dtype=np.float64), axis=0).sum(-1))


def test_vertex_spread_on_a_hand_built_case():
    # Vertex 0 sits 1 mm from its mean in four directions; vertex 1 never moves; vertex 2 is at z = 0, 0, 0, 4
    # (mean 1, distances 1, 1, 1, 3): its spread is sqrt((1 + 1 + 1 + 9) / 4) = sqrt(3), not the mean distance 1.5.
    meshes = torch.tensor([
        [[1.0, 0, 0], [5, 5, 5], [0, 0, 0]],
        [[-1.0, 0, 0], [5, 5, 5], [0, 0, 0]],
        [[0.0, 1, 0], [5, 5, 5], [0, 0, 0]],
        [[0.0, -1, 0], [5, 5, 5], [0, 0, 4]],
    ])  # (S=4, V=3, 3)
    truth = torch.tensor([1.0, 0.0, 3**0.5])
    assert torch.allclose(vertex_spread(meshes), truth)
    batched = torch.stack([meshes, 3 * meshes])  # (B=2, S, V, 3): scaling the samples scales the spread
    assert torch.allclose(vertex_spread(batched), torch.stack([truth, 3 * truth]))


def test_written_spreads_are_the_std_of_the_saved_meshes(report_outputs):
    """uncertainty.npz against the meshes test.py saved: the M = 4 expression meshes (all saved), and
    the N = 16 IdGen shapes of <name>.npz made into meshes by the FLAME model."""
    flame = FLAME(str(report_outputs.parent / "synthetic" / "flame" / "generic_model.pkl"), n_shape=300, n_exp=50)
    for name in reconstructed(report_outputs):
        spreads = np.load(report_outputs / name / "uncertainty.npz")
        saved = np.stack([read_mesh(report_outputs / "flamesample" / f"{name}_0_{k}.ply")[0] for k in range(4)])
        assert not (report_outputs / "flamesample" / f"{name}_0_4.ply").exists()
        np.testing.assert_allclose(spreads["expression_spread_mm"], numpy_spread(saved), atol=1e-3)
        shapes = torch.from_numpy(np.load(report_outputs / f"{name}.npz")["shapes"]).float()  # (16, n_shape)
        with torch.no_grad():
            meshes = flame(torch.nn.functional.pad(shapes, (0, 300 - shapes.shape[1]))).numpy() * 1000.0
        np.testing.assert_allclose(spreads["shape_spread_mm"], numpy_spread(meshes), atol=1e-3)
        assert spreads["shape_spread_mm"].max() > 1.0 and spreads["expression_spread_mm"].max() > 1.0
        assert float(spreads["scale_mm"]) == SPREAD_SCALE_MM


def test_spread_colours_are_viridis_on_the_fixed_scale():
    colours = spread_colors(np.array([0.0, SPREAD_SCALE_MM / 2, SPREAD_SCALE_MM, 3 * SPREAD_SCALE_MM, np.nan, -1.0]))
    # matplotlib's viridis at 0, 0.5 and 1: the ends and the middle of the map.
    assert colours.tolist() == [[68, 1, 84], [33, 145, 140], [253, 231, 37], [253, 231, 37], [68, 1, 84], [68, 1, 84]]
    assert colours.dtype == np.uint8


def test_spread_meshes_carry_the_colours_and_the_original_meshes_stay_plain(report_outputs):
    for name in reconstructed(report_outputs):
        neutral, faces = read_mesh(report_outputs / "shapesample" / f"{name}_0.ply")
        spreads = np.load(report_outputs / name / "uncertainty.npz")
        for key in ("shape", "expression"):
            mesh = trimesh.load(report_outputs / name / f"{key}_spread.ply", process=False)
            np.testing.assert_allclose(mesh.vertices, neutral, atol=1e-4)
            assert np.array_equal(mesh.faces, faces)
            assert np.array_equal(mesh.visual.vertex_colors[:, :3], spread_colors(spreads[f"{key}_spread_mm"]))
        for path in (report_outputs / "shapesample" / f"{name}_0.ply", report_outputs / "flamesample" / f"{name}_0_0.ply"):
            header = path.read_bytes().split(b"end_header")[0]
            assert b"red" not in header and b"binary_little_endian" in header


def _hemisphere():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=80.0)
    return np.asarray(sphere.vertices), np.asarray(sphere.faces)


def test_spread_picture_colours_the_mesh_and_draws_the_bar():
    vertices, faces = _hemisphere()
    low = spread_picture(vertices, faces, np.zeros(len(vertices)), "t", spread_colors, SPREAD_SCALE_MM)
    high = spread_picture(vertices, faces, np.full(len(vertices), 20.0), "t", spread_colors, SPREAD_SCALE_MM)
    assert low.shape == high.shape and low.dtype == np.uint8
    centre = (slice(110, 130), slice(90, 110))  # inside the 200-px view of the sphere (title above it)
    b, g, r = low[centre].reshape(-1, 3).mean(0)
    assert b > g and r > g  # viridis' dark purple
    b, g, r = high[centre].reshape(-1, 3).mean(0)
    assert r > b + 60 and g > b + 60  # its yellow
    # The bar, right of the view: yellow at the top, purple at the bottom, the same in both pictures.
    bar = low[:, 200 + 8 + 7]  # (H, 3) the bar's middle column (layout of spread_picture)
    top, bottom = bar[20 + 10 + 2], bar[20 + 200 - 10 - 3]
    assert top[2] > 200 and top[1] > 200 and top[0] < 80  # BGR yellow
    assert bottom[0] > bottom[1] and bottom[2] > bottom[1]
    assert np.array_equal(bar, high[:, 200 + 8 + 7])


def test_scores_plot_marks_the_pick_at_its_rank():
    scores = np.array([0.1, 0.5, 0.9, 0.3])  # sorted: samples 2, 1, 3, 0
    left, right = 48, 320 - 10  # the plot box (layout of scores_plot)

    def red_x(plot: np.ndarray) -> float:
        b, g, r = (plot[:-20, :, c].astype(int) for c in range(3))  # above the red caption
        return float(np.nonzero((r > 180) & (g < 90) & (b < 90))[1].mean())

    assert abs(red_x(scores_plot(scores, best=1)) - (left + 1.5 / 4 * (right - left))) < 3  # the second of 4 ranks
    assert abs(red_x(scores_plot(scores, best=2)) - (left + 0.5 / 4 * (right - left))) < 3  # the first


def test_write_uncertainty_writes_its_files_into_the_given_folder_or_nothing(report_outputs, tmp_path):
    from ofer.inference.pipeline import Reconstruction

    neutral, faces = read_mesh(report_outputs / "shapesample" / "occluded_00_0.ply")
    v = len(neutral)
    rec = Reconstruction(shapes=np.zeros((3, 10)), scores=np.array([0.2, 0.7, 0.1]), best=1,
                         expressions=np.zeros((2, 10)), jaws=np.zeros((2, 3)), neutral_mm=neutral,
                         expression_mm=np.stack([neutral, neutral]), kpt68_mm=np.zeros((68, 3)), kpt7_mm=np.zeros((7, 3)),
                         shape_spread_mm=np.linspace(0, 9, v), expression_spread_mm=np.zeros(v))
    write_uncertainty(tmp_path / "a", rec, faces)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(UNCERTAINTY_FILES)
    saved = np.load(tmp_path / "a" / "uncertainty.npz")
    assert saved["shape_spread_mm"].dtype == np.float32
    np.testing.assert_allclose(saved["shape_spread_mm"], rec.shape_spread_mm, rtol=1e-6)
    with pytest.raises(ValueError):  # faces that index no vertex: the pictures fail before any file is written
        write_uncertainty(tmp_path / "b", rec, faces + v)
    assert not (tmp_path / "b").exists()
