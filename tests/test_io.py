"""ofer.io: atomic writes, array checks, PLY round trip."""

import os
import stat

import cv2
import numpy as np
import pytest

import ofer.io
from ofer.io import InputError, load_array, read_image, read_mesh, save_npy, write_ply


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


def test_load_array_refuses_non_numeric_non_finite_and_out_of_range_values(tmp_path):
    np.save(tmp_path / "s.npy", np.array(["0.5", "1"]))
    with pytest.raises(InputError, match=r"s\.npy: expected a numeric array, found dtype <U"):
        load_array(tmp_path / "s.npy")
    np.save(tmp_path / "f.npy", np.array([0.5, np.nan, -np.inf]))
    assert load_array(tmp_path / "f.npy").shape == (3,)  # values are checked only when a range is given
    with pytest.raises(InputError, match=r"f\.npy: 2 of 3 values are NaN or infinite"):
        load_array(tmp_path / "f.npy", value_range=(-1, 1))
    np.save(tmp_path / "r.npy", np.array([0.0, 2.0]))
    with pytest.raises(InputError, match=r"r\.npy: values span \[0, 2\], expected within \[-1, 1\]"):
        load_array(tmp_path / "r.npy", value_range=(-1, 1))
    np.save(tmp_path / "ok.npy", np.array([-1.0, 1.0], dtype=np.float16))
    assert load_array(tmp_path / "ok.npy", value_range=(-1, 1)).dtype == np.float16


def test_read_image_refuses_huge_images_by_their_header_before_decoding(tmp_path, monkeypatch):
    from test_inference import forged_png

    forged_png(tmp_path / "huge.png", 40000, 40000)
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((300, 400, 3), np.uint8))
    calls = []
    monkeypatch.setattr(ofer.io.cv2, "imdecode", lambda *a: calls.append(a))
    with pytest.raises(InputError, match=r"huge\.png: image is too large"):
        read_image(tmp_path / "huge.png")
    with pytest.raises(InputError, match=r"big\.png: 400×300 image \(0 megapixels\) is larger than the 0\.1-megapixel "
                       r"limit; downscale it first"):
        read_image(tmp_path / "big.png", max_pixels=100_000)
    assert calls == []  # neither was decoded

    def refuse(*args):
        raise cv2.error("pixels <= CV_IO_MAX_IMAGE_PIXELS")

    monkeypatch.setattr(ofer.io.cv2, "imdecode", refuse)
    with pytest.raises(InputError, match=r"big\.png: OpenCV cannot decode this image"):
        read_image(tmp_path / "big.png")


@pytest.mark.parametrize(("array", "dtype"), [(np.ones((2, 3), bool), "bool"), (np.ones(3, np.complex64), "complex64"),
                                              (np.zeros(2, "datetime64[s]"), "datetime64[s]")])
def test_load_array_refuses_what_is_not_real_numbers_instead_of_casting_it(tmp_path, array, dtype):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(InputError) as err:
        load_array(tmp_path / "a.npy", value_range=(-1, 1))
    assert str(err.value) == f"{tmp_path / 'a.npy'}: expected a numeric array, found dtype {dtype}"


def test_load_array_reads_masks_as_bool_only_when_asked(tmp_path):
    np.save(tmp_path / "b.npy", np.array([True, False]))
    np.save(tmp_path / "i.npy", np.array([1, 0], np.uint8))
    np.save(tmp_path / "two.npy", np.array([2, 0]))
    np.save(tmp_path / "f.npy", np.array([1.0, 0.0]))
    for name in ("b", "i"):
        mask = load_array(tmp_path / f"{name}.npy", (2,), boolean=True)
        assert mask.dtype == np.bool_ and mask.tolist() == [True, False]
    with pytest.raises(InputError, match=r"two\.npy: expected a mask \(bool, or integers 0 and 1\), found dtype int64 "
                                         "with other values"):
        load_array(tmp_path / "two.npy", boolean=True)
    with pytest.raises(InputError, match=r"f\.npy: expected a mask \(bool, or integers 0 and 1\), found dtype float64$"):
        load_array(tmp_path / "f.npy", boolean=True)
