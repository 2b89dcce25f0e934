"""The restricted unpickler: refuses code execution, maps chumpy and old scipy paths, reads torch tensors."""

import os
import pickle
import subprocess

import numpy as np
import pytest
import scipy.sparse
import torch

from ofer.flame import UnsafePickleError, load_flame_model, load_landmark_embedding, load_pickle


class _RunsCommand:
    """Unpickling this would run a shell command (the classic pickle attack)."""

    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


class FakeCh:
    """Pickled under this test module's name, then renamed to chumpy.ch.Ch in the bytes.

    Its state has the shape of a real chumpy ``Ch.__getstate__``: the array plus bookkeeping.
    """

    def __init__(self, x):
        self.x = x
        self._dirty_vars = {"x"}
        self._itr = None
        self._depends_on_deps = {}


def _as_chumpy(raw: bytes) -> bytes:
    renamed = raw.replace(f"{__name__}\nFakeCh\n".encode(), b"chumpy.ch\nCh\n")
    assert renamed != raw
    return renamed


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("call", [os.system, eval, subprocess.Popen], ids=["os.system", "eval", "Popen"])
def test_forbidden_global_is_refused_and_nothing_runs(tmp_path, call):
    marker = tmp_path / "marker"
    argument = f"touch {marker}" if call is not eval else f"open({str(marker)!r}, 'w')"
    if call is subprocess.Popen:
        argument = ["touch", str(marker)]
    path = _write(tmp_path / "evil.pkl", pickle.dumps({"v_template": _RunsCommand(call, argument)}, protocol=2))
    with pytest.raises(UnsafePickleError) as error:
        load_pickle(path)
    assert str(path) in str(error.value)
    # the refused global as the file names it (protocol 2 writes Python 2 module names)
    assert f".{call.__name__}'" in str(error.value)
    assert not marker.exists()


def test_setting_state_on_an_allowed_class_is_refused(tmp_path):
    # GLOBAL scipy.sparse.csc csc_matrix; state (None, {'toarray': 1}); BUILD -> setattr on the class
    raw = b"\x80\x02cscipy.sparse.csc\ncsc_matrix\nN}X\x07\x00\x00\x00toarrayK\x01s\x86b."
    original = scipy.sparse.csc_matrix.toarray
    with pytest.raises(UnsafePickleError):
        load_pickle(_write(tmp_path / "patch.pkl", raw))
    assert scipy.sparse.csc_matrix.toarray is original


def test_protocol0_reconstructor_only_builds_allowed_classes(tmp_path):
    raw = b"ccopy_reg\n_reconstructor\n(cnumpy\nndarray\nc__builtin__\nobject\nNtR."
    with pytest.raises(UnsafePickleError, match="_reconstructor"):
        load_pickle(_write(tmp_path / "p0.pkl", raw))


def test_truncated_pickle_names_the_file(tmp_path):
    path = _write(tmp_path / "cut.pkl", pickle.dumps({"a": np.zeros(100)}, protocol=2)[:-20])
    with pytest.raises(pickle.UnpicklingError, match="cut.pkl"):
        load_pickle(path)


def test_chumpy_objects_and_old_scipy_paths_load_as_arrays(tmp_path):
    x = np.arange(12.0).reshape(4, 3)
    regressor = scipy.sparse.csc_matrix(np.eye(3)[:2])
    raw = pickle.dumps({"v_template": FakeCh(x), "nested": [FakeCh(FakeCh(x[:1]))], "J_regressor": regressor}, 2)
    raw = _as_chumpy(raw).replace(b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")
    assert b"scipy.sparse.csc\ncsc_matrix" in raw
    loaded = load_pickle(_write(tmp_path / "chumpy.pkl", raw))
    assert type(loaded["v_template"]) is np.ndarray
    np.testing.assert_array_equal(loaded["v_template"], x)
    np.testing.assert_array_equal(loaded["nested"][0], x[:1])
    assert scipy.sparse.issparse(loaded["J_regressor"])
    np.testing.assert_array_equal(loaded["J_regressor"].toarray(), np.eye(3)[:2])


def test_protocol0_chumpy_pickle_loads(tmp_path):
    # protocol 0 goes through copy_reg._reconstructor and __builtin__.object (Python 2 files)
    raw = _as_chumpy(pickle.dumps({"shapedirs": FakeCh(np.ones((2, 3, 4)))}, protocol=0))
    loaded = load_pickle(_write(tmp_path / "p0.pkl", raw))
    np.testing.assert_array_equal(loaded["shapedirs"], np.ones((2, 3, 4)))


def test_chumpy_object_without_array_state_is_an_error(tmp_path):
    raw = _as_chumpy(pickle.dumps(FakeCh(None), protocol=2)).replace(b"X\x01\x00\x00\x00x", b"X\x01\x00\x00\x00y")
    with pytest.raises(ValueError, match="chumpy.ch.Ch"):
        load_pickle(_write(tmp_path / "nox.pkl", raw))


def test_pickled_torch_tensors_become_numpy(tmp_path):
    tensor = torch.arange(24, dtype=torch.float32).view(2, 3, 4)[:, 1:]  # a strided view
    loaded = load_pickle(_write(tmp_path / "t.pkl", pickle.dumps({"t": tensor, "i": torch.tensor([3, 4])}, 2)))
    np.testing.assert_array_equal(loaded["t"], tensor.numpy())
    np.testing.assert_array_equal(loaded["i"], [3, 4])


def _landmark_dict(rng):
    return {
        "static_lmk_faces_idx": rng.integers(0, 100, 51),
        "static_lmk_bary_coords": rng.random((51, 3)),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, 100, (79, 17))),
        "dynamic_lmk_bary_coords": torch.from_numpy(rng.random((79, 17, 3)).astype(np.float32)),
        "full_lmk_faces_idx": rng.integers(0, 100, (1, 68)),
        "full_lmk_bary_coords": rng.random((1, 68, 3)),
    }


def test_landmark_npy_with_torch_tensors(tmp_path):
    original = _landmark_dict(np.random.default_rng(0))
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, np.array(original, dtype=object), allow_pickle=True)
    loaded = load_landmark_embedding(path)
    for key, value in original.items():
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        assert type(loaded[key]) is np.ndarray
        np.testing.assert_array_equal(loaded[key], expected)


def test_landmark_npy_with_forbidden_global_is_refused(tmp_path):
    marker = tmp_path / "marker"
    payload = _landmark_dict(np.random.default_rng(0))
    payload["extra"] = _RunsCommand(os.system, f"touch {marker}")
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, np.array(payload, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="system"):
        load_landmark_embedding(path)
    assert not marker.exists()


def test_landmark_npy_errors(tmp_path):
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(ValueError, match="pickled dict"):
        load_landmark_embedding(plain)
    incomplete = tmp_path / "incomplete.npy"
    payload = _landmark_dict(np.random.default_rng(0))
    del payload["full_lmk_faces_idx"]
    np.save(incomplete, np.array(payload, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="full_lmk_faces_idx"):
        load_landmark_embedding(incomplete)


def test_missing_flame_file_says_where_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_flame_model(tmp_path / "generic_model.pkl")
    message = str(error.value)
    assert "https://flame.is.tue.mpg.de" in message and "generic_model.pkl" in message
    assert "pretrained/FLAME2020/" in message and "--opt key=value" in message


def _minimal_flame(num_vertices=4):
    return {
        "v_template": np.zeros((num_vertices, 3)),
        "f": np.array([[0, 1, 2], [0, 2, 3]]),
        "shapedirs": np.zeros((num_vertices, 3, 400)),
        "posedirs": np.zeros((num_vertices, 3, 36)),
        "J_regressor": scipy.sparse.csc_matrix(np.full((5, num_vertices), 1.0 / num_vertices)),
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "weights": np.full((num_vertices, 5), 0.2),
    }


def test_flame_model_bad_keys_and_shapes(tmp_path):
    good = _minimal_flame()
    model = load_flame_model(_write(tmp_path / "ok.pkl", pickle.dumps(good, 2)))
    assert model["J_regressor"].shape == (5, 4) and isinstance(model["J_regressor"], np.ndarray)

    missing = dict(good)
    del missing["posedirs"]
    path = _write(tmp_path / "missing.pkl", pickle.dumps(missing, 2))
    with pytest.raises(ValueError, match="posedirs") as error:
        load_flame_model(path)
    assert str(path) in str(error.value)

    wrong = dict(good, weights=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="'weights' has shape"):
        load_flame_model(_write(tmp_path / "wrong.pkl", pickle.dumps(wrong, 2)))

    not_a_dict = _write(tmp_path / "list.pkl", pickle.dumps([1, 2], 2))
    with pytest.raises(ValueError, match="pickled dict"):
        load_flame_model(not_a_dict)

