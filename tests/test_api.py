"""The Python API (`ofer.load`, `OferModel`, `Result`): test.py's results from a few lines of Python."""

import json

import numpy as np
import pytest

import ofer
from conftest import REPO
from ofer.api import ImageError, sampling_overrides
from ofer.config import ConfigError
from test_inference import FAST_SAMPLING, run

SAMPLING = {"num_shapes": 4, "num_expressions": 3, "sampler": "ddim", "steps": 2, "exp_sampler": "ddim", "exp_steps": 2}


@pytest.fixture(scope="module")
def model(synthetic_root, checkpoints):
    flame = synthetic_root / "flame"
    return ofer.load(idrank=str(checkpoints["idrank"]), idgen=checkpoints["idgen"], expgen=str(checkpoints["expgen"]),
                     cfg=str(REPO / "configs" / "demo" / "test.yml"), device="cpu", opts=[
                         f"model.flame_model_path={flame / 'generic_model.pkl'}",
                         f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
                         f"model.front_indices_path={flame / 'frontindices.npy'}",
                         "test.num_saved_expressions=2"])


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("done.json", "summary.json") and p.relative_to(folder).parts[0] != "report"}


def test_reconstruct_crop_saves_exactly_what_test_py_writes(model, synthetic_root, checkpoints, tmp_path):
    name = (synthetic_root / "test" / "list.txt").read_text().split()[1]
    (tmp_path / "list.txt").write_text(f"{name}\n")
    assert run(synthetic_root, checkpoints, tmp_path / "list.txt", synthetic_root / "test", tmp_path / "cli",
               "--seed", "5") == 0
    result = model.reconstruct_crop(str(synthetic_root / "test" / f"{name}.jpg"), seed=5, **SAMPLING)
    marker = result.save(tmp_path / "api")
    assert files(tmp_path / "api") == files(tmp_path / "cli") and len(files(tmp_path / "api")) == 14
    cli_marker = json.loads((tmp_path / "cli" / name / "done.json").read_text())
    assert {k: v for k, v in cli_marker.items() if k != "run"} == marker


def test_results_hold_meshes_scores_and_every_shape_sample(model, synthetic_root):
    name = (synthetic_root / "test" / "list.txt").read_text().split()[0]
    result = model.reconstruct_crop(synthetic_root / "test" / f"{name}.jpg", **SAMPLING)
    v = result.neutral_mesh.shape[0]
    assert result.expression_meshes.shape == (3, v, 3) and result.scores.shape == (4,)
    assert result.faces.shape[1] == 3 and result.faces.max() < v
    shapes = result.shape_meshes()
    assert shapes.shape == (4, v, 3)
    np.testing.assert_allclose(shapes[0], result.neutral_mesh, atol=1e-4)  # the best-ranked one first
    order = np.argsort(-result.scores)
    np.testing.assert_allclose(result.shape_meshes(2), shapes[:2], atol=1e-4)
    assert not np.allclose(shapes[1], shapes[0]) and result.best == order[0]
    mesh = result.to_trimesh(1)
    assert mesh.vertices.shape == (v, 3) and np.allclose(mesh.vertices, result.expression_meshes[1])


def test_batches_give_what_single_images_give(model, synthetic_root):
    names = (synthetic_root / "test" / "list.txt").read_text().split()
    paths = [synthetic_root / "test" / f"{n}.jpg" for n in names]
    together = model.reconstruct_crops(paths, batch=3, **SAMPLING)
    alone = [model.reconstruct_crop(p, **SAMPLING) for p in paths]
    for a, b in zip(together, alone):
        assert a.name == b.name
        np.testing.assert_allclose(a.expression_meshes, b.expression_meshes, atol=1e-4)


def test_sampling_arguments_are_checked_with_test_pys_rules(model, synthetic_root):
    crop = synthetic_root / "test" / f"{(synthetic_root / 'test' / 'list.txt').read_text().split()[0]}.jpg"
    with pytest.raises(ConfigError, match="num_shapes=0: config key 'test.numsamples': 0 is out of range"):
        model.reconstruct_crop(crop, num_shapes=0)
    with pytest.raises(ConfigError, match="steps must be in \\[1, 1000\\], got 5000"):
        model.reconstruct_crop(crop, exp_steps=5000)
    with pytest.raises(TypeError, match="unknown sampling argument.* smapler"):
        model.reconstruct_crop(crop, smapler="ddpm")
    assert model.settings(sampler="ddpm").steps is None  # a fixed sequence drops the config's steps
    assert model.settings(cuda_graph=True).cuda_graph is True and model.cfg.test.cuda_graph is False
    assert sampling_overrides({"sampler": "ddpm", "steps": None}, ["test.steps=3"]) == [
        "test.steps=null", "test.steps=3", "test.sampling=ddpm"]


def test_a_bad_crop_is_an_image_error_or_returned_in_its_place(model, synthetic_root, tmp_path):
    good = synthetic_root / "test" / f"{(synthetic_root / 'test' / 'list.txt').read_text().split()[0]}.jpg"
    with pytest.raises(ImageError, match="missing.jpg: image file not found"):
        model.reconstruct_crop(tmp_path / "missing.jpg")
    results = model.reconstruct_crops([tmp_path / "missing.jpg", good], on_error="return", **SAMPLING)
    assert isinstance(results[0], ImageError) and results[0].name == "missing"
    assert results[1].neutral_mesh.shape[1] == 3


def test_fast_sampling_of_the_cli_tests_matches_the_api_arguments():
    """The CLI tests' flags and SAMPLING above are the same settings (so the equality test compares like with like)."""
    flags = dict(zip(FAST_SAMPLING[::2], FAST_SAMPLING[1::2]))
    assert {k.lstrip("-").replace("-", "_"): v for k, v in flags.items()} == {
        k: str(v) for k, v in SAMPLING.items() if k not in ("num_shapes", "num_expressions")}


def test_a_photo_gives_what_preprocessing_then_test_py_give(model, tmp_path):
    """reconstruct(photo) = `python -m ofer.preprocess` + reconstruct_crop, for a file and for an array."""
    skimage_data = pytest.importorskip("skimage.data")
    import cv2

    from ofer.preprocess import run as preprocess

    photo = np.ascontiguousarray(skimage_data.astronaut()[..., ::-1])  # RGB -> BGR
    cv2.imwrite(str(tmp_path / "astro.png"), photo)
    preprocess(tmp_path / "astro.png", tmp_path / "crops")
    expected = model.reconstruct_crop(tmp_path / "crops" / "astro.jpg", **SAMPLING)
    for given in (str(tmp_path / "astro.png"), photo):
        result = model.reconstruct(given, name="astro", **SAMPLING)
        np.testing.assert_array_equal(result.expression_meshes, expected.expression_meshes)
        np.testing.assert_array_equal(result.arcface, expected.arcface)
    with pytest.raises(ImageError, match="the photo array: no face found"):
        model.reconstruct(np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(ImageError, match=r"must be \(H, W, 3\) uint8 BGR, got float32 \(8, 8\)"):
        model.reconstruct(np.zeros((8, 8), np.float32))
