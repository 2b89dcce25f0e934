"""Shared fixtures: a tiny synthetic data set (synthetic FLAME-format model) made once per session.
Tests marked ``gpu`` are skipped (and listed as skipped) where CUDA is not available."""

from pathlib import Path

import pytest
import torch

from ofer.checkpoints import save_checkpoint
from ofer.config import config_to_dict, load_config
from ofer.data.synthetic import SyntheticSettings, generate
from ofer.io import load_array
from ofer.models.stages import DiffusionStage, IdRank

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the `gpu` tests without CUDA (CI has none; `bash bench/gpu_check.sh` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """4 training actors, 2 validation actors, 3 test images (2 occluded)."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate(root, SyntheticSettings(actors=4, val_actors=2, images_per_actor=2, test_images=3,
                                            occluded_fraction=0.67, seed=1))


def demo_config(stage: str, root: Path, out: Path, *overrides: str):
    """A demo stage config pointed at `root`, small enough for a test."""
    flame = root / "flame"
    return load_config(REPO / "configs" / "demo" / f"{stage}.yml", [
        f"dataset.root={root}",
        f"model.flame_model_path={flame / 'generic_model.pkl'}",
        f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
        f"model.front_indices_path={flame / 'frontindices.npy'}",
        f"train.output_dir={out}",
        "dataset.batch_size=2",
        "dataset.num_workers=0",
        *overrides,
    ])


@pytest.fixture(scope="session")
def checkpoints(synthetic_root, tmp_path_factory):
    """Randomly initialised demo-sized IdGen, ExpGen and IdRank checkpoints written by the test."""
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for stage in ("idgen", "expgen", "idrank"):
        cfg = demo_config(stage, synthetic_root, out)
        if stage == "idrank":
            front = load_array(cfg.model.front_indices_path, (None,))
            model = IdRank(cfg, shape_dim=3 * len(front))
        else:
            model = DiffusionStage(cfg)
        paths[stage] = out / f"{stage}.tar"
        save_checkpoint(paths[stage], model, config=config_to_dict(cfg))
    return paths


REPORT_ODD_NAME = "odd dir/<b>&\"it's\""  # an image name with HTML special characters, in a sub-folder


@pytest.fixture(scope="session")
def report_outputs(tmp_path_factory) -> Path:
    """test.py's outputs with the bundled demo models (N = 16, M = 4, all four expressions saved), each
    image's uncertainty files among them, and the run's report.

    Images: three synthetic test faces, one of them copied to REPORT_ODD_NAME, and `broken`, whose
    ArcFace array is not an array (it fails, with its reason in summary.json). Treat as read-only:
    copy it before changing files.
    """
    import numpy as np

    from ofer.inference.cli import main as run_test
    from ofer.inference.cli import read_list

    root = tmp_path_factory.mktemp("report_data")
    data = generate(root / "synthetic", SyntheticSettings(test_images=3), training=False)
    images = data / "test"
    names = (images / "list.txt").read_text().split()
    (images / "odd dir").mkdir()
    for suffix in (".jpg", ".npy"):
        (images / f"{REPORT_ODD_NAME}{suffix}").write_bytes((images / f"{names[0]}{suffix}").read_bytes())
    (images / "broken.jpg").write_bytes((images / f"{names[0]}.jpg").read_bytes())
    np.save(images / "broken.npy", np.array(["not", "numbers"]))
    list_file = root / "list.txt"
    list_file.write_text("\n".join([*names, f"{REPORT_ODD_NAME}.jpg", "broken"]) + "\n")
    out = root / "out"
    flame = data / "flame"
    options = [f"model.flame_model_path={flame / 'generic_model.pkl'}",
               f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
               f"model.front_indices_path={flame / 'frontindices.npy'}",
               "test.numsamples=16", "test.num_expressions=4"]
    bundled = REPO / "models" / "demo"
    code = run_test(["--cfg", str(REPO / "configs" / "demo" / "test.yml"),
                     "--checkpoint1", str(bundled / "idrank.tar"), "--checkpoint2", str(bundled / "idgen.tar"),
                     "--checkpoint3", str(bundled / "expgen.tar"), "--filename", str(list_file),
                     "--imagepath", str(images), "--outputpath", str(out), "--device", "cpu",
                     *[arg for option in options for arg in ("--opt", option)]])
    assert code == 1  # `broken` failed, the others were reconstructed
    for name, _ in read_list(list_file, images):  # test.py writes each image's spread files with the others
        assert (out / name / "uncertainty.npz").is_file() == (name != "broken"), name
    return out
