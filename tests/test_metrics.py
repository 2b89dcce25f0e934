"""Sample accuracy and diversity metrics on hand-built meshes, and the folder command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ofer.eval import EXIT_COMPLETE, EXIT_MISSING, EXIT_SETUP, exit_code
from ofer.eval.metrics import diversity, evaluate_samples, main, vertex_errors
from ofer.io import write_ply

# Four vertices at the origin; the first two visible, the last two occluded.
GT = np.zeros((4, 3))
OCCLUDED = np.array([False, False, True, True])
# Sample k moves vertex v by OFFSETS[k, v] along x.
OFFSETS = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 0.0, 0.0], [2.0, 2.0, 4.0, 4.0]])
SAMPLES = np.zeros((3, 4, 3))
SAMPLES[..., 0] = OFFSETS


def test_vertex_errors_are_euclidean():
    pred = np.array([[[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]]])  # (1, 2, 3)
    np.testing.assert_allclose(vertex_errors(pred, np.zeros((2, 3))), [[5.0, 2.0]])


def test_ranked_oracle_mean_and_diversity_per_region():
    report = evaluate_samples(SAMPLES, GT, OCCLUDED, ranked_index=1)
    # per-sample region errors: s0 (vis 1, occ 1), s1 (3, 0), s2 (2, 4)
    assert report["ranked"] == pytest.approx({"all": 1.5, "visible": 3.0, "occluded": 0.0})
    assert report["oracle"] == pytest.approx({"all": 1.0, "visible": 1.0, "occluded": 0.0})  # best per region
    for region in ("all", "visible", "occluded"):
        assert report["oracle"][region] <= report["ranked"][region]
    # mean mesh offsets: visible (1+3+2)/3 = 2, occluded (1+0+4)/3 = 5/3
    assert report["mean"] == pytest.approx({"all": 11 / 6, "visible": 2.0, "occluded": 5 / 3})
    # spread: visible {1,3,2} -> sqrt(2/3); occluded {1,0,4} -> sqrt((4+25+49)/27) = sqrt(26)/3
    expected = {"visible": np.sqrt(2 / 3), "occluded": np.sqrt(26) / 3}
    expected["all"] = (expected["visible"] + expected["occluded"]) / 2
    assert report["diversity"] == pytest.approx(expected)


def test_identical_samples_have_no_diversity_and_their_mean_is_the_sample():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(50, 3))
    gt = rng.normal(size=(50, 3))
    occluded = rng.random(50) < 0.3
    report = evaluate_samples(np.stack([one] * 5), gt, occluded)
    assert report["mean"] == pytest.approx(report["ranked"]) and report["oracle"] == pytest.approx(report["ranked"])
    assert report["diversity"] == pytest.approx({"all": 0.0, "visible": 0.0, "occluded": 0.0}, abs=1e-12)
    errors = np.linalg.norm(one - gt, axis=1)
    assert report["ranked"]["occluded"] == pytest.approx(errors[occluded].mean())
    assert report["ranked"]["visible"] == pytest.approx(errors[~occluded].mean())


def test_without_mask_only_the_whole_region_is_reported():
    report = evaluate_samples(SAMPLES, GT)
    assert report["ranked"]["all"] == pytest.approx(1.0)
    assert np.isnan(report["ranked"]["visible"]) and np.isnan(report["diversity"]["occluded"])


def test_rigid_alignment_removes_pose_but_not_diversity():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(30, 3)) * 40
    rotations = Rotation.from_rotvec(rng.normal(scale=0.3, size=(4, 3))).as_matrix()  # (4, 3, 3)
    samples = np.einsum("sij,vj->svi", rotations, gt) + rng.normal(size=(4, 1, 3)) * 5  # (4, 30, 3)
    aligned = evaluate_samples(samples, gt, align=True)
    raw = evaluate_samples(samples, gt)
    assert aligned["ranked"]["all"] < 1e-9 and raw["ranked"]["all"] > 1.0
    assert aligned["diversity"] == raw["diversity"]
    assert raw["diversity"]["all"] == pytest.approx(diversity(samples).mean())
    # a local deformation outside the fitting subset does not disturb the fit on the subset
    bent = gt.copy()
    bent[20:] += 7.0
    subset = evaluate_samples(bent[None], gt, align=True, align_indices=np.arange(20),
                              occluded=np.arange(30) >= 20)
    assert subset["ranked"]["visible"] < 1e-9 and subset["ranked"]["occluded"] == pytest.approx(np.sqrt(3) * 7)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same V"):
        evaluate_samples(SAMPLES[:, :3], GT)
    with pytest.raises(ValueError, match="boolean"):
        evaluate_samples(SAMPLES, GT, OCCLUDED.astype(int))
    with pytest.raises(ValueError, match="ranked_index"):
        evaluate_samples(SAMPLES, GT, ranked_index=3)


def test_folder_command(tmp_path):
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    gt_dir, out = tmp_path / "gt", tmp_path / "out"
    name = "scan_0_7"  # its samples scan_0_7_0_<k>.ply must not count as samples of "scan"
    write_ply(gt_dir / f"{name}.ply", GT, faces)
    write_ply(gt_dir / "scan.ply", GT, faces)
    np.save(gt_dir / f"{name}_occlusion.npy", OCCLUDED)
    for k, sample in enumerate(SAMPLES):
        write_ply(out / "flamesample" / f"{name}_0_{k}.ply", sample, faces)
    write_ply(out / "flamesample" / f"{name}_0_10.ply", SAMPLES[1], faces)  # k = 10 sorts after k = 2
    write_ply(out / "shapesample" / f"{name}_0.ply", GT + [0.0, 0.5, 0.0], faces)
    report = main(["--pred", str(out), "--gt", str(gt_dir), "--out", str(tmp_path / "metrics.json")])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["missing"] == ["scan"] and saved["n_evaluated"] == 1
    image = report["per_image"][name]
    assert image["num_samples"] == 4
    assert image["ranked"] == pytest.approx({"all": 1.0, "visible": 1.0, "occluded": 1.0})  # k = 0
    assert image["oracle"]["occluded"] == pytest.approx(0.0)
    assert image["neutral_shape"]["all"] == pytest.approx(0.5)
    assert saved["mean_over_images"]["ranked"] == pytest.approx(image["ranked"])


def test_command_refuses_a_missing_prediction_folder_in_one_line(tmp_path, caplog):
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    write_ply(tmp_path / "gt" / "scan.ply", GT, faces)
    argv = ["--pred", str(tmp_path / "no_out"), "--gt", str(tmp_path / "gt")]
    assert exit_code(main, argv) == EXIT_SETUP
    assert f"{tmp_path / 'no_out'}: prediction folder not found (test.py's --outputpath)" in caplog.text
    (tmp_path / "no_out").mkdir()
    assert exit_code(main, argv) == EXIT_MISSING  # the folder holds no samples of "scan"
    for k, sample in enumerate(SAMPLES):
        write_ply(tmp_path / "no_out" / "flamesample" / f"scan_0_{k}.ply", sample, faces)
    assert exit_code(main, argv) == EXIT_COMPLETE


def test_rows_follow_the_list_and_show_the_neutral_baseline(tmp_path, capsys):
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    out, gt_dir = tmp_path / "out", tmp_path / "gt"
    for name in ("b", "a", "c"):
        write_ply(gt_dir / f"{name}.ply", GT, faces)
        for k, sample in enumerate(SAMPLES):
            write_ply(out / "flamesample" / f"{name}_0_{k}.ply", sample, faces)
    write_ply(out / "shapesample" / "b_0.ply", GT + [0.0, 0.5, 0.0], faces)
    (out / "summary.json").write_text(json.dumps({"listed": ["c", "b", "a"]}))  # test.py records its list's order
    report = main(["--pred", str(out), "--gt", str(gt_dir)])
    assert list(report["per_image"]) == ["c", "b", "a"]
    printed = capsys.readouterr().out
    assert "neut/all" in printed and "neut = IdRank's neutral shape" in printed
    [b_row] = [line for line in printed.splitlines() if line.startswith("b ")]
    assert b_row.split()[-1] == "0.500"  # the baseline of the image that has a shapesample
    assert [line.split()[-1] for line in printed.splitlines() if line.startswith(("a ", "c "))] == ["-", "-"]
    (tmp_path / "list.txt").write_text("a.jpg\n# skipped\narcface_input/b.jpg\n")
    assert list(main(["--pred", str(out), "--gt", str(gt_dir), "--list", str(tmp_path / "list.txt")])["per_image"]) \
        == ["a", "b", "c"]
