"""The synthetic photos: painted facial features that follow the mesh."""

import numpy as np
import pytest

from ofer.data.synthetic import SampleMaker, SyntheticSettings
from ofer.flame import FLAME


@pytest.fixture(scope="module")
def maker(synthetic_root) -> SampleMaker:
    flame = synthetic_root / "flame"
    model = FLAME(flame / "generic_model.pkl", n_shape=300, n_exp=50,
                  landmark_embedding_path=flame / "landmark_embedding.npy")
    return SampleMaker(model, SyntheticSettings())


def test_features_sit_on_eyes_brows_and_lips(maker):
    zeros = np.zeros(300, np.float32)
    template = maker.renderer.vertices(zeros, zeros[:50], zeros[:3])
    lmk = maker.renderer.landmarks68(template)
    weights = maker.features  # (V, 3) eyes, brows, lips
    assert weights.min() >= 0 and weights.sum(1).max() <= 1 + 1e-9

    def nearest(point):
        return np.argmin(np.linalg.norm(template - point, axis=1))

    assert weights[nearest(lmk[37:39].mean(0)), 0] > 0.9  # right eye, between its upper lids
    assert weights[nearest(lmk[19]), 1] > 0.9  # right brow
    assert weights[nearest(lmk[51]), 2] > 0.9  # upper lip
    assert weights[nearest(lmk[30])].sum() == 0  # nose tip: skin
    assert 0.02 < np.mean(weights.sum(1) > 0) < 0.3  # features, not the whole head


def test_identity_albedo_paints_features_darker_than_skin(maker):
    zeros = np.zeros(300, np.float32)
    template = maker.renderer.vertices(zeros, zeros[:50], zeros[:3])
    lmk = maker.renderer.landmarks68(template)
    eye = np.argmin(np.linalg.norm(template - lmk[37:39].mean(0), axis=1))
    nose = np.argmin(np.linalg.norm(template - lmk[30], axis=1))
    for seed in range(5):
        _, albedo = maker.identity(np.random.default_rng(seed))
        assert albedo.shape == (len(template), 3)
        assert albedo[eye].sum() < 0.5 * albedo[nose].sum()
