"""The synthetic FLAME-format model: real file formats, a closed outward mesh, sensible scale."""

import pickle
import pickletools

import numpy as np
import pytest
import scipy.sparse
import torch
import trimesh

from ofer.flame import FLAME, load_flame_model, load_landmark_embedding, load_pickle
from ofer.flame.flame import NOW_LANDMARKS
from ofer.flame.synthetic import main, write_synthetic_flame


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("synthetic"), seed=0)


def _globals(raw: bytes) -> set[str]:
    return {arg for opcode, arg, _ in pickletools.genops(raw) if opcode.name == "GLOBAL"}


@pytest.mark.filterwarnings("ignore:Please import `csc_matrix`:DeprecationWarning")  # plain pickle.loads below
def test_written_like_a_real_flame_file(written):
    raw = written.model.read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2
    assert _globals(raw) == {
        "chumpy.ch Ch",
        "scipy.sparse.csc csc_matrix",
        "numpy.core.multiarray _reconstruct",
        "numpy ndarray",
        "numpy dtype",
        "_codecs encode",
        "__builtin__ set",
    }
    with pytest.raises(ModuleNotFoundError, match="chumpy"):  # a plain unpickler needs chumpy, like the real file
        pickle.loads(raw)
    loaded = load_pickle(written.model)
    assert set(loaded) == {
        "f", "J_regressor", "kintree_table", "J", "bs_style", "weights", "posedirs", "v_template", "shapedirs", "bs_type"
    }
    assert isinstance(loaded["J_regressor"], scipy.sparse.csc_matrix)
    num_vertices = loaded["v_template"].shape[0]
    assert 1000 <= num_vertices <= 3000
    assert loaded["shapedirs"].shape == (num_vertices, 3, 400)
    assert loaded["posedirs"].shape == (num_vertices, 3, 36)
    assert loaded["J_regressor"].shape == (5, num_vertices)
    assert loaded["kintree_table"][0].tolist() == [2**32 - 1, 0, 1, 1, 1]
    np.testing.assert_allclose(loaded["J"], loaded["J_regressor"] @ loaded["v_template"])


def test_landmark_file_holds_torch_tensors_like_the_real_one(written):
    trusted = np.load(written.landmarks, allow_pickle=True).item()  # our own file, just written
    assert isinstance(trusted["dynamic_lmk_faces_idx"], torch.Tensor)
    assert isinstance(trusted["dynamic_lmk_bary_coords"], torch.Tensor)
    assert isinstance(trusted["static_lmk_faces_idx"], np.ndarray)


def test_same_seed_same_model_other_seed_other_model(written, tmp_path):
    again = write_synthetic_flame(tmp_path / "again", seed=0)
    assert again.model.read_bytes() == written.model.read_bytes()
    for key, value in load_landmark_embedding(written.landmarks).items():
        np.testing.assert_array_equal(load_landmark_embedding(again.landmarks)[key], value)
    np.testing.assert_array_equal(np.load(again.front_indices), np.load(written.front_indices))
    other = load_flame_model(write_synthetic_flame(tmp_path / "other", seed=1).model)
    assert not np.allclose(other["shapedirs"], load_flame_model(written.model)["shapedirs"])


def test_closed_outward_head_sized_mesh(written):
    model = load_flame_model(written.model)
    mesh = trimesh.Trimesh(model["v_template"], model["f"], process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    extent = np.ptp(model["v_template"], axis=0)
    assert 0.15 <= extent[0] <= 0.2 and 0.15 <= extent[2] <= 0.25
    assert model["v_template"][:, 2].max() == pytest.approx(0.065)  # nose tip
    nose = model["v_template"][np.argmax(model["v_template"][:, 2])]
    assert abs(nose[0]) < 0.01  # on the midline


def test_bases_have_a_real_scale(written):
    model = load_flame_model(written.model)
    largest = np.linalg.norm(model["shapedirs"], axis=1).max(axis=0)  # (400,) per coefficient, metres
    assert 0.002 <= largest[0] <= 0.015 and largest[299] < largest[0] / 10  # identity: mm, decaying
    identity_moves = np.linalg.norm(model["shapedirs"][..., :300], axis=1).max(axis=1)  # (V,)
    z = model["v_template"][:, 2]
    back = z < z.min() + 0.3 * (z.max() - z.min())  # the rear of the head
    assert identity_moves[back].max() < 0.1 * identity_moves.max()  # identity shapes the face
    assert 0.002 <= largest[300] <= 0.01  # expression
    expression_moves = np.linalg.norm(model["shapedirs"][..., 300:], axis=1).max(axis=1)  # (V,)
    assert np.mean(expression_moves < 1e-4) > 0.3  # localised: much of the head is untouched
    weights = model["weights"]
    assert np.all(weights >= 0) and np.allclose(weights.sum(axis=1), 1.0)


def test_landmarks_sit_on_the_face(written):
    flame = FLAME(written.model, landmark_embedding_path=written.landmarks)
    with torch.no_grad():
        vertices = flame(torch.zeros(1, 300))
        kpt7 = flame.landmarks7(vertices)[0].numpy()
    right_outer, right_inner, left_inner, left_outer, nose, mouth_right, mouth_left = kpt7
    # FLAME frame: x to the subject's left, y up, z out of the face
    assert right_outer[0] < right_inner[0] < 0 < left_inner[0] < left_outer[0]
    assert mouth_right[0] < 0 < mouth_left[0]
    assert mouth_left[1] < nose[1] < left_inner[1]
    assert np.all(kpt7[:, 2] > 0)
    front = set(np.load(written.front_indices).tolist())
    faces = flame.faces.numpy()
    kpt7_vertices = faces[flame.static_lmk_faces_idx.numpy()[np.array(NOW_LANDMARKS) - 17]].ravel()
    assert set(kpt7_vertices.tolist()) <= front
    assert len(front) < flame.num_vertices / 2


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--seed", "3"])
    assert (tmp_path / "cli" / "generic_model.pkl").is_file()
    assert (tmp_path / "cli" / "frontindices.npy").is_file()
    assert "synthetic" in capsys.readouterr().out
