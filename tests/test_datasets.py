"""Identity and expression datasets on tiny hand-built data in both list-file layouts."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ofer.config import DatasetConfig, OcclusionConfig
from ofer.data.datasets import ExpressionDataset, IdentityDataset, load_pickled_npy
from ofer.encoders.normalise import CLIP_MEAN, CLIP_STD
from ofer.io import InputError
from ofer.preprocess import typical_arcface_matrix

# Every image is one flat colour and its ArcFace array one constant (id / 64, inside ArcFace's
# input range and exact in float32), both keyed by an image id, so an item tells which file each
# of its K images came from and whether image and array match.
ARCFACE_STEP = 1 / 64
COLOURS = {i: ((37 * i) % 200 + 20, (91 * i) % 200 + 30, (53 * i) % 200 + 40) for i in range(1, 40)}  # BGR


def write_pair(path: Path, image_id: int, size: int = 224, arcface_shape=(3, 112, 112)) -> None:
    """A flat-colour .jpg and the .npy beside it holding `image_id` everywhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), COLOURS[image_id], np.uint8))
    np.save(path.with_suffix(".npy"), np.full(arcface_shape, image_id * ARCFACE_STEP, np.float32))


def save_list(root: Path, name: str, table: dict) -> None:
    (root / "image_paths").mkdir(parents=True, exist_ok=True)
    np.save(root / "image_paths" / f"{name}.npy", table, allow_pickle=True)


def image_ids(images: torch.Tensor) -> list[int]:
    """The colour id of each (3, 224, 224) CLIP-normalised RGB image in a (K, 3, 224, 224) batch."""
    rgb = (images * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]) * 255
    ids = []
    for mean_rgb in rgb.mean(dim=(2, 3)).numpy():
        bgr = mean_rgb[::-1]
        ids.append(next(i for i, c in COLOURS.items() if np.abs(np.array(c) - bgr).max() < 3))
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> types.SimpleNamespace:
    """AAA in MICA layout (paths relative to arcface_input/ and FLAME_parameters/, `betas` 400),
    BBB in OFER layout (paths relative to BBB/, `shape` 300, 256-pixel crops), EEE expression frames."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    shapes = {}
    # AAA: MICA layout, actor -> ([images], fit)
    table = {}
    for actor, ids in {"a1": [1, 2], "a2": [3, 4, 5]}.items():
        for i in ids:
            write_pair(root / "AAA/arcface_input" / actor / f"{i}.jpg", i)
        betas = rng.normal(size=400).astype(np.float32)
        fit = root / "AAA/FLAME_parameters" / actor / "fit.npz"
        fit.parent.mkdir(parents=True)
        np.savez(fit, betas=betas, pose=np.zeros(15, np.float32))
        shapes[("AAA", actor)] = betas[:300]
        table[actor] = ([f"{actor}/{i}.jpg" for i in ids], f"{actor}/fit.npz")
    save_list(root, "AAA", table)
    # BBB: OFER layout, actor -> [fit, [images]] with numpy strings
    for i in (6, 7):
        write_pair(root / "BBB/arcface_input/b1" / f"{i}.jpg", i, size=256)
    shape = rng.normal(size=300).astype(np.float32)
    (root / "BBB/FLAME23_parameters/b1").mkdir(parents=True)
    np.savez(root / "BBB/FLAME23_parameters/b1/fit.npz", shape=shape)
    shapes[("BBB", "b1")] = shape
    images = np.array(["arcface_input/b1/6.jpg", "arcface_input/b1/7.jpg"])
    save_list(root, "BBB", {"b1": ["FLAME23_parameters/b1/fit.npz", images]})
    # EEE: expression frames, TEMPEH npz, CoMA npy, MICA npz, TEMPEH npz without shape
    params = root / "EEE/FLAME_parameters/e1"
    params.mkdir(parents=True)
    t_shape, t_exp, t_pose = rng.normal(size=(1, 300)), rng.normal(size=(1, 100)), rng.normal(size=(1, 15))
    np.savez(params / "f0.npz", shape=t_shape, exp=t_exp, pose=t_pose, trans=np.zeros(3))
    coma = {k: rng.normal(size=n).astype(np.float32) for k, n in
            {"shape": 300, "exp": 100, "jaw": 3, "rot": 3, "eye": 6, "neck": 3, "trans": 3}.items()}
    np.save(params / "f1.npy", coma, allow_pickle=True)
    m_betas, m_pose = rng.normal(size=400), rng.normal(size=15)
    np.savez(params / "f2.npz", betas=m_betas, pose=m_pose)
    n_exp, n_pose = rng.normal(size=50), rng.normal(size=9)
    np.savez(params / "f3.npz", exp=n_exp, pose=n_pose)
    frames = []
    for k, name in enumerate(["f0.npz", "f1.npy", "f2.npz", "f3.npz"]):
        write_pair(root / "EEE/arcface_input/e1" / f"{10 + k}.jpg", 10 + k)
        frames.append([f"e1/{10 + k}.jpg", f"e1/{name}"])
    save_list(root, "EEE", {"e1": frames})
    expected = [  # (expression, jaw, shape) per frame
        (t_exp[0, :50], t_pose[0, 3:6], t_shape[0]),
        (coma["exp"][:50], coma["jaw"], coma["shape"]),
        (m_betas[300:350], m_pose[6:9], m_betas[:300]),
        (n_exp, n_pose[3:6], np.zeros(300)),
    ]
    (root / "NOLIST").mkdir()
    return types.SimpleNamespace(root=root, cfg=DatasetConfig(root=str(root), n_images=3), shapes=shapes,
                                 images={("AAA", "a1"): {1, 2}, ("AAA", "a2"): {3, 4, 5}, ("BBB", "b1"): {6, 7}},
                                 expected=expected)


def test_identity_items_from_both_layouts_mix_all_actors(tiny):
    ds = IdentityDataset(tiny.cfg, ["AAA", "BBB"])
    assert ds.actors == [("AAA", "a1"), ("AAA", "a2"), ("BBB", "b1")]
    for index in range(len(ds)):
        item = ds[index]
        key = (item["dataset"], item["actor"])
        assert key == ds.actors[index]
        assert item["image"].shape == (3, 3, 224, 224) and item["image"].dtype == torch.float32
        assert item["arcface"].shape == (3, 3, 112, 112) and item["arcface"].dtype == torch.float32
        np.testing.assert_array_equal(item["shape"].numpy(), tiny.shapes[key])
        ids = image_ids(item["image"])
        assert set(ids) <= tiny.images[key]
        # each crop is paired with its own ArcFace array
        assert ids == [round(float(a) / ARCFACE_STEP) for a in item["arcface"][:, 0, 0, 0]]
        assert torch.all(item["arcface"] == item["arcface"][:, :1, :1, :1])


def test_image_is_rgb_clip_normalised(tiny):
    item = IdentityDataset(tiny.cfg, ["AAA"])[0]
    image_id = round(float(item["arcface"][0, 0, 0, 0]) / ARCFACE_STEP)
    rgb = np.array(COLOURS[image_id][::-1]) / 255.0
    expected = (rgb - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(item["image"][0].mean(dim=(1, 2)).numpy(), expected, atol=3 / 255 / 0.26)


def test_n_shape_takes_leading_coefficients(tiny):
    item = IdentityDataset(tiny.cfg, ["AAA"], n_shape=100)[1]
    np.testing.assert_array_equal(item["shape"].numpy(), tiny.shapes[("AAA", "a2")][:100])


def test_sampling_with_replacement_is_deterministic_per_seed_epoch_index(tiny):
    cfg = dataclasses.replace(tiny.cfg, n_images=8)

    def draws(seed: int, epoch: int) -> list[int]:
        ds = IdentityDataset(cfg, ["AAA"], seed=seed)
        ds.set_epoch(epoch)
        return image_ids(ds[0]["image"])

    first = draws(0, 0)
    assert len(first) == 8 and set(first) <= {1, 2}  # 8 draws of 2 images: with replacement
    assert draws(0, 0) == first
    assert any(draws(0, epoch) != first for epoch in range(1, 4))
    assert any(draws(seed, 0) != first for seed in range(1, 4))


def test_list_file_errors_name_the_file(tiny, tmp_path):
    with pytest.raises(InputError, match=re.escape(str(tiny.root / "image_paths/NOLIST.npy")) + ".*MICA"):
        IdentityDataset(tiny.cfg, ["AAA", "NOLIST"])
    root = tmp_path / "root"
    (root / "X").mkdir(parents=True)
    save_list(root, "X", {"actor7": 42})
    with pytest.raises(InputError, match="actor7"):
        IdentityDataset(DatasetConfig(root=str(root)), ["X"])
    save_list(root, "X", {"empty": ([], "fit.npz"), "ok": (["1.jpg"], "fit.npz")})
    with pytest.raises(InputError, match="'empty' lists no images"):
        IdentityDataset(DatasetConfig(root=str(root)), ["X"])
    skipping = IdentityDataset(DatasetConfig(root=str(root), on_bad_sample="skip"), ["X"])
    assert skipping.actors == [("X", "ok")] and skipping.bad_samples == 1


def test_malicious_list_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "X").mkdir()
    save_list(tmp_path, "X", {"a": Evil()})
    with pytest.raises(InputError, match="refused.*system"):
        IdentityDataset(DatasetConfig(root=str(tmp_path)), ["X"])
    with pytest.raises(InputError, match="refused"):
        load_pickled_npy(tmp_path / "image_paths/X.npy")
    assert not marker.exists()


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """BAD: actor x has a good image, a missing one and one with a (3,100,100) array; y only a
    missing image; z only a wrong-shape array; w a good image but no fit file."""
    root = tmp_path_factory.mktemp("bad")
    write_pair(root / "BAD/arcface_input/x/20.jpg", 20)
    write_pair(root / "BAD/arcface_input/x/22.jpg", 22, arcface_shape=(3, 100, 100))
    write_pair(root / "BAD/arcface_input/z/23.jpg", 23, arcface_shape=(3, 100, 100))
    write_pair(root / "BAD/arcface_input/w/24.jpg", 24)
    for actor in "xyz":
        (root / "BAD/FLAME_parameters" / actor).mkdir(parents=True)
        np.savez(root / "BAD/FLAME_parameters" / actor / "fit.npz", shape=np.ones(300))
    save_list(root, "BAD", {
        "x": (["x/20.jpg", "x/21.jpg", "x/22.jpg"], "x/fit.npz"),
        "y": (["y/21.jpg"], "y/fit.npz"),
        "z": (["z/23.jpg"], "z/fit.npz"),
        "w": (["w/24.jpg"], "w/fit.npz"),
    })
    return root


def test_bad_files_raise_naming_the_file(bad):
    ds = IdentityDataset(DatasetConfig(root=str(bad), n_images=2), ["BAD"])
    culprits = {1: "arcface_input/y/21.jpg", 2: "arcface_input/z/23.npy", 3: "FLAME_parameters/w/fit.npz"}
    for index, culprit in culprits.items():
        with pytest.raises(InputError, match=re.escape(str(bad / "BAD" / culprit))):
            ds[index]
    with pytest.raises(InputError, match=r"\(3, 100, 100\)"):
        ds[2]


def test_bad_files_are_skipped_counted_and_logged_once(bad, caplog):
    cfg = DatasetConfig(root=str(bad), n_images=4, on_bad_sample="skip")
    ds = IdentityDataset(cfg, ["BAD"])
    with caplog.at_level(logging.WARNING, logger="ofer.data.datasets"):
        items = {}
        for epoch in range(6):
            ds.set_epoch(epoch)
            for index in range(len(ds)):
                items[epoch, index] = ds[index]
    for item in items.values():  # only x's good image is ever returned
        assert item["actor"] == "x"
        assert torch.all(item["arcface"] == 20 * ARCFACE_STEP)
    culprits = ["x/21.jpg", "x/22.npy", "y/21.jpg", "z/23.npy", "w/fit.npz"]
    assert ds.bad_samples == len(culprits)
    assert len(caplog.records) == len(culprits)
    for culprit in culprits:
        assert any(culprit in record.getMessage() for record in caplog.records)
    # the draws do not depend on which bad files this process already knew
    fresh = IdentityDataset(cfg, ["BAD"])
    fresh.set_epoch(5)
    assert torch.equal(fresh[1]["image"], items[5, 1]["image"])


def test_expression_dataset_reads_tempeh_coma_and_mica_files(tiny):
    ds = ExpressionDataset(tiny.cfg, ["EEE"])
    assert len(ds) == 4
    for index, (expression, jaw, shape) in enumerate(tiny.expected):
        item = ds[index]
        assert item["image"].shape == (1, 3, 224, 224) and item["arcface"].shape == (1, 3, 112, 112)
        assert image_ids(item["image"]) == [10 + index] and torch.all(item["arcface"] == (10 + index) * ARCFACE_STEP)
        np.testing.assert_allclose(item["expression"].numpy(), expression, rtol=1e-6)
        np.testing.assert_allclose(item["jaw"].numpy(), jaw, rtol=1e-6)
        np.testing.assert_allclose(item["target"].numpy(), np.concatenate([expression, jaw]), rtol=1e-6)
        np.testing.assert_allclose(item["shape"].numpy(), shape, rtol=1e-6)
        assert item["target"].shape == (53,) and item["actor"] == "e1" and item["dataset"] == "EEE"


def test_expression_file_with_too_few_coefficients_names_the_file(tmp_path):
    write_pair(tmp_path / "E/arcface_input/a/1.jpg", 1)
    (tmp_path / "E/FLAME_parameters/a").mkdir(parents=True)
    np.savez(tmp_path / "E/FLAME_parameters/a/p.npz", exp=np.zeros(10), pose=np.zeros(15))
    save_list(tmp_path, "E", {"a": [("a/1.jpg", "a/p.npz")]})
    ds = ExpressionDataset(DatasetConfig(root=str(tmp_path)), ["E"])
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "E/FLAME_parameters/a/p.npz")) + ".*'exp'"):
        ds[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batches_match_across_worker_counts(tiny, num_workers):
    ds = IdentityDataset(dataclasses.replace(tiny.cfg, n_images=2), ["AAA", "BBB"], seed=3)
    reference = [ds[i] for i in range(len(ds))]
    batches = list(DataLoader(ds, batch_size=2, num_workers=num_workers))
    assert batches[0]["image"].shape == (2, 2, 3, 224, 224)
    assert batches[0]["arcface"].shape == (2, 2, 3, 112, 112)
    assert batches[0]["shape"].shape == (2, 300)
    assert batches[0]["actor"] == ["a1", "a2"] and batches[1]["dataset"] == ["BBB"]
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([r["image"] for r in reference]))


def test_occlusion_is_applied_to_training_items_only(tiny, monkeypatch):
    calls, built = [], []

    class StandInAugment:
        def __init__(self, prob, min_area, max_area, kinds):
            built.append((prob, min_area, max_area, kinds))

        def __call__(self, image224, arcface112, arcface_matrix, rng):
            calls.append((image224.shape, image224.dtype, arcface112.shape, arcface_matrix.tolist(), type(rng)))
            return np.zeros_like(image224), np.full_like(arcface112, -1.0), np.ones((224, 224), bool)

    monkeypatch.setitem(sys.modules, "ofer.data.occlusion", types.SimpleNamespace(OcclusionAugment=StandInAugment))
    occlusion = OcclusionConfig(enabled=True, prob=0.7, min_area=0.1, max_area=0.2, kinds=["hand"])
    cfg = dataclasses.replace(tiny.cfg, occlusion=occlusion)

    val_item = IdentityDataset(cfg, ["AAA"], split="val")[0]
    assert built == [] and calls == []
    assert torch.all(val_item["arcface"] > 0)

    item = IdentityDataset(cfg, ["AAA"], split="train")[0]
    assert built == [(0.7, 0.1, 0.2, ["hand"])]
    typical = typical_arcface_matrix().tolist()  # the MICA layout stores no alignment
    assert calls == [((224, 224, 3), np.uint8, (3, 112, 112), typical, np.random.Generator)] * cfg.n_images
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert torch.allclose(item["image"], black[None, :, None, None].expand_as(item["image"]))
    assert torch.all(item["arcface"] == -1)


def _one_actor(root: Path, arcface: np.ndarray) -> Path:
    """Data set ONE: one actor, one image whose ArcFace array is `arcface`; returns the image path."""
    image = root / "ONE/arcface_input/a/1.jpg"
    write_pair(image, 1)
    np.save(image.with_suffix(".npy"), arcface)
    (root / "ONE/FLAME_parameters/a").mkdir(parents=True)
    np.savez(root / "ONE/FLAME_parameters/a/fit.npz", shape=np.ones(300))
    save_list(root, "ONE", {"a": (["a/1.jpg"], "a/fit.npz")})
    return image


@pytest.mark.parametrize("arcface", [np.full((3, 112, 112), 200.0, np.float32), np.ones((3, 112, 112), bool),
                                     np.ones((3, 112, 112), np.complex64)], ids=["0-255", "bool", "complex"])
def test_training_checks_arcface_inputs_as_test_py_does(tmp_path, arcface):
    """ArcFace arrays scaled 0..255 (or not real numbers) were trained on; test.py refuses them."""
    from ofer.inference.pipeline import load_inputs

    image = _one_actor(tmp_path, arcface)
    with pytest.raises(InputError) as by_test_py:
        load_inputs(image)
    with pytest.raises(InputError) as by_training:
        IdentityDataset(DatasetConfig(root=str(tmp_path), n_images=1), ["ONE"])[0]
    assert str(by_training.value) == str(by_test_py.value)
    assert str(by_training.value).startswith(f"{image.with_suffix('.npy')}: ")


def test_a_coma_dict_with_mixed_key_types_and_no_exp_names_the_file(tmp_path):
    from ofer.data.datasets import read_expression_params

    path = tmp_path / "frame.npy"
    np.save(path, {1: np.zeros(3), "jaw": np.zeros(3), ("a", 2): 0}, allow_pickle=True)
    with pytest.raises(InputError) as err:
        read_expression_params(path)
    assert str(err.value) == f"{path}: missing key 'exp' (found ('a', 2), 1, jaw)"


def test_a_list_file_with_a_string_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    save_list(tmp_path, "X", {"actor": (["a.jpg"], "fit.npz")})
    path = tmp_path / "image_paths/X.npy"
    path.write_bytes(path.read_bytes().replace(b"actor", b"act\xe9r"))
    (tmp_path / "X").mkdir()
    with pytest.raises(InputError) as err:
        IdentityDataset(DatasetConfig(root=str(tmp_path)), ["X"])
    assert str(err.value) == (f"{path}: a string in the pickle is not UTF-8 text (invalid continuation byte: byte "
                              "b'\\xe9' in b'act\\xe9r')")
