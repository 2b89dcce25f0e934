"""ofer.io: atomic writes, array checks, PLY round trip."""

import os
import stat

import numpy as np
import pytest

from ofer.io import InputError, load_array, read_mesh, save_npy, write_ply


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    save_npy(tmp_path / "a.npy", np.zeros(3))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.npy").st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # no temporary file left


def test_load_array_checks_shape_and_refuses_pickles(tmp_path):
    save_npy(tmp_path / "a.npy", np.zeros((3, 5)))
    assert load_array(tmp_path / "a.npy", (3, None)).shape == (3, 5)
    with pytest.raises(InputError, match=r"a\.npy: expected an array of shape \(3, 112, 112\), found \(3, 5\)"):
        load_array(tmp_path / "a.npy", (3, 112, 112))
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):
        load_array(tmp_path / "obj.npy")


def test_ply_round_trip_keeps_vertex_order(tmp_path):
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(50, 3)).astype(np.float32)
    faces = rng.integers(0, 50, size=(80, 3))
    write_ply(tmp_path / "m.ply", vertices, faces)
    v, f = read_mesh(tmp_path / "m.ply")
    assert np.array_equal(v.astype(np.float32), vertices) and np.array_equal(f, faces)
