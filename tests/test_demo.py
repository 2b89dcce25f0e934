"""The demo: bundled inference-only models, the quick synthetic test set, the error table, photos."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, demo_config
from ofer.checkpoints import checkpoint_config, load_state, read_checkpoint
from ofer.config import load_config
from ofer.data.synthetic import SyntheticSettings, generate, has_training_data
from ofer.eval.synthetic_table import COLUMNS, format_table, synthetic_table
from ofer.inference.bundle import make_bundle, write_bundle
from ofer.inference.cli import main as run_test
from ofer.models.stages import DiffusionStage
from ofer.train.trainer import Trainer

BUNDLED = REPO / "models" / "demo"
DEMO_TEST_CFG = REPO / "configs" / "demo" / "test.yml"
STAGES = ("idgen", "expgen", "idrank")
TRAINING_ONLY = {"optimizer", "scheduler", "rng", "train_weights", "ema_n_averaged", "best", "var_sched"}


@pytest.fixture(scope="module")
def demo_test_set(tmp_path_factory):
    """The demo's synthetic model (seed 0, as the bundle was trained on) and 4 test images, no training set."""
    root = tmp_path_factory.mktemp("demo") / "synthetic"
    return generate(root, SyntheticSettings(test_images=4), training=False)


def test_test_only_data_is_the_test_set_of_a_full_run(tmp_path):
    small = SyntheticSettings(actors=2, val_actors=1, images_per_actor=1, test_images=2)
    full = generate(tmp_path / "full", small)
    quick = generate(tmp_path / "quick", small, training=False)
    other = generate(tmp_path / "other", SyntheticSettings(actors=3, val_actors=1, images_per_actor=1, test_images=2))
    assert has_training_data(full) and not has_training_data(quick)
    names = (full / "test" / "list.txt").read_text().split()
    assert names == (quick / "test" / "list.txt").read_text().split()
    for name in names:  # the same test images, whatever the number of training actors
        for root in (quick, other):
            assert np.array_equal(np.load(full / "test" / f"{name}.npy"), np.load(root / "test" / f"{name}.npy"))
            assert (full / "test_gt" / f"{name}.ply").read_bytes() == (root / "test_gt" / f"{name}.ply").read_bytes()


def test_bundle_is_inference_only_and_loads_as_float32(synthetic_root, tmp_path):
    trainer = Trainer(demo_config("idgen", synthetic_root, tmp_path / "run", "train.max_steps=2", "train.val_steps=2",
                                  "train.val_batches=1", "train.ema_decay=0.9", "test.steps=2"))
    source = trainer.fit()
    path = write_bundle(source, tmp_path / "idgen.tar", "float16", made_by="a test")
    bundle = read_checkpoint(path)
    assert not TRAINING_ONLY & set(bundle)
    assert bundle["bundle"]["made_by"] == "a test" and bundle["bundle"]["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for part in ("net", "arcface") for v in bundle[part].values() if v.is_floating_point())
    assert path.stat().st_size < source.stat().st_size / 4  # no raw copy, no optimiser, half precision

    trained = read_checkpoint(source)
    model = DiffusionStage(checkpoint_config(bundle, "unused.yml"), load_weights=False)
    load_state(bundle, model, path)
    for key, value in model.net.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, trained["net"][key].half().float())  # the EMA weights, rounded to float16
    assert bundle["net"].keys() == trained["net"].keys()


def test_bundle_keeps_float32_when_asked():
    state = {"w": torch.randn(3), "count": torch.tensor(4)}
    bundle = make_bundle({"net": state, "optimizer": {}, "config": {"stage": "idgen", "train": {"seed": 5}}}, "float32")
    assert torch.equal(bundle["net"]["w"], state["w"]) and bundle["net"]["count"].dtype == torch.int64
    assert "optimizer" not in bundle and bundle["bundle"]["train_seed"] == 5
    with pytest.raises(ValueError, match="dtype"):
        make_bundle({"net": state}, "int8")


def test_bundled_models_are_small_and_inference_only():
    files = [BUNDLED / f"{stage}.tar" for stage in STAGES]
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    for f in files:
        ckpt = read_checkpoint(f)
        assert not TRAINING_ONLY & set(ckpt), f
        assert ckpt["bundle"]["made_by"], f  # how it was trained is recorded in the file


@pytest.fixture(scope="module")
def demo_outputs(demo_test_set, tmp_path_factory):
    """test.py's outputs with the bundled files and the demo config (jaw limits on) for the 4 test images."""
    out = tmp_path_factory.mktemp("demo_out")
    code = run_test(["--cfg", str(DEMO_TEST_CFG),
                     "--checkpoint1", str(BUNDLED / "idrank.tar"), "--checkpoint2", str(BUNDLED / "idgen.tar"),
                     "--checkpoint3", str(BUNDLED / "expgen.tar"),
                     "--filename", str(demo_test_set / "test" / "list.txt"), "--imagepath", str(demo_test_set / "test"),
                     "--outputpath", str(out), "--device", "cpu", "--num-shapes", "16", "--num-expressions", "4",
                     "--opt", f"model.flame_model_path={demo_test_set / 'flame' / 'generic_model.pkl'}",
                     "--opt", f"model.flame_lmk_embedding_path={demo_test_set / 'flame' / 'landmark_embedding.npy'}",
                     "--opt", f"model.front_indices_path={demo_test_set / 'flame' / 'frontindices.npy'}"])
    assert code == 0
    return out


def test_bundled_models_beat_the_baselines(demo_test_set, demo_outputs):
    """test.py with the bundled files on 4 held-out faces: better than mean face, random sample, neutral face."""
    cfg = load_config(DEMO_TEST_CFG)
    rows = synthetic_table(demo_outputs, demo_test_set, cfg.model.jaw_scale, cfg.test.jaw_limits)  # as demo.py
    mean = rows["MEAN"]
    assert mean["shape_pick"] < mean["mean_face"]
    assert mean["shape_pick"] < mean["shape_random"]
    assert mean["exp_first*"] < mean["exp_neutral*"]
    # Diversity on the visible vertices exists for every image; on the occluded ones only where there is an occluder.
    for name, row in rows.items():
        if name != "MEAN":
            assert math.isfinite(row["div_vis"]) and row["div_vis"] > 0
            assert math.isnan(row["div_occ"]) == name.startswith("clear")
    text = format_table(rows)
    assert all(key in text for key in COLUMNS) and "mm" in text


def test_table_poses_the_jaw_that_test_py_posed(demo_test_set, demo_outputs, tmp_path):
    """exp_first* puts the first jaw on the true identity clamped into the jaw limits when they are
    set (all-zero limits: as if the saved jaws were zero), and as sampled when they are not."""
    closed = synthetic_table(demo_outputs, demo_test_set, jaw_limits=[0.0] * 6)
    raw = synthetic_table(demo_outputs, demo_test_set)
    zeroed = tmp_path / "out"
    shutil.copytree(demo_outputs, zeroed)
    for path in zeroed.glob("*.npz"):
        rec = dict(np.load(path))
        assert (rec["jaws"][0] != 0).any()
        np.savez(path, **{**rec, "jaws": np.zeros_like(rec["jaws"])})
    without_jaw = synthetic_table(zeroed, demo_test_set)
    for name, row in closed.items():
        assert row["exp_first*"] == pytest.approx(without_jaw[name]["exp_first*"], abs=1e-6), name
        assert raw[name]["exp_first*"] != pytest.approx(row["exp_first*"], abs=1e-6), name


@pytest.fixture
def demo(monkeypatch):
    """The repository's demo.py, imported as a module."""
    monkeypatch.syspath_prepend(str(REPO))
    import demo

    return demo


def test_demo_photos_runs_preprocess_and_test(demo, demo_test_set, tmp_path, monkeypatch, capsys):
    """`demo.py --photos DIR --keypoints FILE`: crops, meshes, pictures, and the warning about synthetic models."""
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    crop = cv2.imread(str(demo_test_set / "test" / "clear_02.jpg"))
    cv2.imwrite(str(photos / "face.jpg"), crop)
    # The 224 crop places the eyes, nose and mouth near these points (the ArcFace template scaled up).
    kps = [[80, 95], [144, 95], [112, 130], [86, 165], [138, 165]]
    (tmp_path / "kps.json").write_text(json.dumps({"face.jpg": {"kps": kps}}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(demo_test_set)
    monkeypatch.chdir(tmp_path)  # the test config's FLAME paths are relative: data/synthetic/...
    monkeypatch.setattr(demo, "TEST_CFG", str(REPO / "configs" / "demo" / "test.yml"))
    ckpt = {stage: BUNDLED / f"{stage}.tar" for stage in STAGES}
    assert demo.photos(photos, tmp_path / "kps.json", ckpt, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "shapesample" / "face_0.ply").is_file()
    assert (tmp_path / "out" / "face" / "overlay.png").is_file()
    assert "not meaningful" in printed and "python test.py" in printed and "python -m ofer.preprocess" in printed


def test_demo_photos_in_a_fresh_folder_makes_the_synthetic_model_first(demo, demo_test_set, tmp_path, monkeypatch,
                                                                        capsys):
    """`python demo.py --photos DIR` as the first command of a fresh clone: the demo models need the
    synthetic FLAME-format model, which is written first (no data/ yet)."""
    import cv2

    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "face.jpg"), cv2.imread(str(demo_test_set / "test" / "clear_02.jpg")))
    (tmp_path / "kps.json").write_text(json.dumps({"face.jpg": {"kps": [[80, 95], [144, 95], [112, 130],
                                                                       [86, 165], [138, 165]]}}))
    for folder in ("models", "configs"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--photos", str(photos), "--keypoints", str(tmp_path / "kps.json")]) == 0
    assert (tmp_path / "data" / "synthetic" / "flame" / "generic_model.pkl").is_file()
    assert (tmp_path / "output" / "demo_photos" / "shapesample" / "face_0.ply").is_file()
    assert "not meaningful" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--opt", "train.max_steps=5"], "--actors and --opt apply with --train only"),
    (["--actors", "5"], "--actors and --opt apply with --train only"),
    (["--keypoints", "kps.json"], "--keypoints applies with --photos only"),
    (["--train", "--actors", "0"], "--actors 0: must be at least 1"),
])
def test_demo_refuses_flags_it_would_ignore_or_cannot_use(demo, argv, message, capsys):
    with pytest.raises(SystemExit) as code:
        demo.main(argv)
    assert code.value.code == 2 and message in capsys.readouterr().err


def test_demo_photos_from_a_missing_folder_says_preprocessing_stopped(demo, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    ckpt = {stage: BUNDLED / f"{stage}.tar" for stage in STAGES}
    assert demo.photos(tmp_path / "no_photos", None, ckpt, tmp_path / "out") == 2
    assert f"preprocessing {tmp_path / 'no_photos'} stopped before any photo" in caplog.text


def test_bundle_write_failure_names_the_file(tmp_path, monkeypatch, caplog):
    """A full disk while writing a bundle: one error line naming the file, exit 1, nothing left behind."""
    import torch

    from ofer.inference import bundle

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 1024")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "idgen.tar"
    assert bundle.main(["--checkpoint", str(BUNDLED / "idgen.tar"), "--out", str(out)]) == 1
    assert any(str(out) in r.getMessage() and "could not be written" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []


def test_the_table_from_the_command_line_for_any_output_folder(demo_test_set, demo_outputs, tmp_path, capsys):
    """`python -m ofer.eval.synthetic_table` prints demo.py's table, posing the jaw with the run's recorded
    settings; images without outputs are listed and the exit code says so."""
    from ofer.eval import EXIT_COMPLETE, EXIT_MISSING, exit_code
    from ofer.eval.synthetic_table import main

    cfg = load_config(DEMO_TEST_CFG)
    expected = synthetic_table(demo_outputs, demo_test_set, cfg.model.jaw_scale, cfg.test.jaw_limits)
    assert exit_code(main, ["--pred", str(demo_outputs), "--data", str(demo_test_set)]) == EXIT_COMPLETE
    printed = capsys.readouterr().out
    assert format_table(expected) in printed
    partial = tmp_path / "out"
    shutil.copytree(demo_outputs, partial)
    name = (demo_test_set / "test" / "list.txt").read_text().split()[1]
    (partial / "shapesample" / f"{name}_0.ply").unlink()
    assert exit_code(main, ["--pred", str(partial), "--data", str(demo_test_set), "--out", str(tmp_path / "t.json")]) \
        == EXIT_MISSING
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["missing"] == [name] and name not in report["rows"]
    assert f"no outputs for 1 of 4 images: {name}" in capsys.readouterr().out
