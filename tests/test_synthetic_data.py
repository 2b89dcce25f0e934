"""The synthetic photos: painted facial features that follow the mesh."""

import numpy as np
import pytest

from ofer.data.synthetic import GENERATOR_VERSION, SampleMaker, SyntheticSettings, generator_version
from ofer.flame import FLAME


@pytest.fixture(scope="module")
def maker(synthetic_root) -> SampleMaker:
    flame = synthetic_root / "flame"
    model = FLAME(flame / "generic_model.pkl", n_shape=300, n_exp=50,
                  landmark_embedding_path=flame / "landmark_embedding.npy")
    return SampleMaker(model, SyntheticSettings())


@pytest.fixture(scope="module")
def nearest(maker):
    """Index of the template vertex nearest to landmark k (or the mean of landmarks k)."""
    lmk = maker.renderer.landmarks68(maker.template)
    return lambda k: int(np.argmin(np.linalg.norm(maker.template - lmk[k].reshape(-1, 3).mean(0), axis=1)))


def test_features_sit_on_eyes_brows_and_lips(maker, nearest):
    weights = maker.features  # (V, 3) eyes, brows, lips
    assert weights.min() >= 0 and weights.sum(1).max() <= 1 + 1e-9
    assert weights[nearest([37, 38]), 0] > 0.9  # right eye, between its upper lids
    assert weights[nearest(19), 1] > 0.9  # right brow
    assert weights[nearest(51), 2] > 0.9  # upper lip
    assert weights[nearest(30)].sum() == 0  # nose tip: skin
    assert 0.02 < np.mean(weights.sum(1) > 0) < 0.3  # features, not the whole head


def test_identity_albedo_paints_features_darker_than_skin(maker, nearest):
    eye, nose = nearest([37, 38]), nearest(30)
    for seed in range(5):
        _, albedo = maker.identity(np.random.default_rng(seed))
        assert albedo.shape == (len(maker.features), 3)
        assert albedo[eye].sum() < 0.5 * albedo[nose].sum()


def test_data_set_is_stamped_with_the_generator_version(synthetic_root, tmp_path):
    assert generator_version(synthetic_root) == GENERATOR_VERSION
    assert generator_version(tmp_path) is None  # nothing generated there
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "list.txt").write_text("a\n")
    assert generator_version(tmp_path) == "1"  # made before stamps existed
