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
