"""Shared fixtures: a tiny synthetic data set (synthetic FLAME-format model) made once per session."""

from pathlib import Path

import pytest

from ofer.config import load_config
from ofer.data.synthetic import SyntheticSettings, generate

REPO = Path(__file__).resolve().parents[1]


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
