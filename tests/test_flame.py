"""FLAME layer: blend shapes, skinning, landmarks and front-face rule, on the synthetic model."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ofer.flame import FLAME, front_face_indices, load_flame_model, load_landmark_embedding
from ofer.flame.flame import NOW_LANDMARKS, contour_table_row
from ofer.flame.lbs import batch_rodrigues, vertices2landmarks
from ofer.flame.synthetic import write_synthetic_flame

JAW = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Synthetic model files and their arrays rounded to float32, the precision FLAME keeps."""
    paths = write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=0)
    model = {
        key: value.astype(np.float32).astype(np.float64) if value.dtype == np.float64 else value
        for key, value in load_flame_model(paths.model).items()
    }
    return paths, model, load_landmark_embedding(paths.landmarks)


@pytest.fixture(scope="module")
def flame64(assets):
    """Double precision so comparisons with numpy can be tight."""
    paths, _, _ = assets
    return FLAME(paths.model, landmark_embedding_path=paths.landmarks).double()


def _rotation(rotvec) -> np.ndarray:
    return Rotation.from_rotvec(rotvec).as_matrix()


def test_rodrigues_matches_scipy():
    rng = np.random.default_rng(0)
    vectors = np.concatenate(
        [rng.normal(size=(50, 3)) * 2.0, rng.normal(size=(5, 3)) * 1e-7, np.zeros((1, 3)), [[np.pi, 0, 0]]]
    )
    ours = batch_rodrigues(torch.from_numpy(vectors)).numpy()
    np.testing.assert_allclose(ours, Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)
    assert np.array_equal(ours[55], np.eye(3))  # exactly the identity at zero angle


def test_rodrigues_gradient_at_zero_is_the_cross_product_matrix():
    zero = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(lambda v: batch_rodrigues(v)[0], zero)[:, :, 0]  # (3,3,3)
    assert torch.isfinite(jacobian).all()
    # dR/dv_x at 0 is the generator of rotations about x
    np.testing.assert_allclose(jacobian[..., 0].numpy(), [[0, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)


def test_zero_pose_is_template_plus_blend_shapes(assets):
    paths, model, _ = assets
    n_shape, n_exp = 20, 10  # fewer than the file's 300/100: the first columns are used
    flame = FLAME(paths.model, n_shape=n_shape, n_exp=n_exp).double()
    rng = np.random.default_rng(1)
    shape, expression = rng.normal(size=(3, n_shape)), rng.normal(size=(3, n_exp))
    vertices = flame(torch.from_numpy(shape), torch.from_numpy(expression)).numpy()
    shapedirs = model["shapedirs"]
    expected = (
        model["v_template"]
        + np.einsum("vck,bk->bvc", shapedirs[..., :n_shape], shape)
        + np.einsum("vck,bk->bvc", shapedirs[..., 300 : 300 + n_exp], expression)
    )
    # float32 skinning weights sum to 1 only up to ~3e-8, hence 1e-8 m (0.01 micrometre)
    np.testing.assert_allclose(vertices, expected, rtol=0, atol=1e-8)


def test_global_pose_rotates_rigidly_about_the_root_joint(flame64, assets):
    _, model, _ = assets
    rotvec = np.array([0.2, -0.5, 0.1])
    posed = flame64(torch.zeros(1, 300, dtype=torch.float64), pose=torch.from_numpy(rotvec[None])).numpy()[0]
    root = model["J_regressor"][0] @ model["v_template"]
    expected = (model["v_template"] - root) @ _rotation(rotvec).T + root
    np.testing.assert_allclose(posed, expected, atol=1e-8)


def test_jaw_moves_only_jaw_skinned_vertices_as_a_rigid_hinge(flame64, assets):
    _, model, _ = assets
    rotvec = np.array([0.3, 0.05, 0.0])
    zeros = torch.zeros(1, 300, dtype=torch.float64)
    rest = flame64(zeros).numpy()[0]
    opened = flame64(zeros, jaw=torch.from_numpy(rotvec[None])).numpy()[0]
    weights = model["weights"][:, JAW]
    still = weights == 0
    assert still.sum() > 0 and (weights == 1).sum() > 0
    np.testing.assert_array_equal(opened[still], rest[still])
    assert np.abs(opened[weights == 1] - rest[weights == 1]).max() > 5e-3

    # fully jaw-skinned vertices: pose correctives of the jaw block, then a rotation about the jaw joint
    rotation = _rotation(rotvec)
    jaw_block = model["posedirs"][..., 9 * (JAW - 1) : 9 * JAW]  # (V,3,9): joints after the root
    corrected = model["v_template"] + jaw_block @ (rotation - np.eye(3)).ravel()
    joint = model["J_regressor"][JAW] @ model["v_template"]
    expected = (corrected - joint) @ rotation.T + joint
    full = weights == 1
    np.testing.assert_allclose(opened[full], expected[full], atol=1e-8)


def test_jaw_opening_moves_the_lower_lip_landmarks_only(flame64):
    zeros = torch.zeros(1, 300, dtype=torch.float64)
    rest = flame64.landmarks68(flame64(zeros))[0].numpy()
    opened = flame64.landmarks68(flame64(zeros, jaw=torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64)))[0].numpy()
    lower_lip, upper_lip = [56, 57, 58, 65, 66, 67], [50, 51, 52, 61, 62, 63]
    assert np.all(opened[lower_lip, 1] < rest[lower_lip, 1] - 5e-3)  # down by more than 5 mm
    np.testing.assert_allclose(opened[upper_lip], rest[upper_lip], atol=1e-12)
    np.testing.assert_allclose(opened[17:48], rest[17:48], atol=1e-12)  # brows, nose, eyes


def test_neck_rotation_moves_child_joints_about_the_neck(assets):
    from ofer.flame.lbs import lbs

    _, model, _ = assets
    rotvec = np.array([0.0, 0.4, 0.2])
    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in model.items()}
    parents = torch.tensor([-1, 0, 1, 1, 1])
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 3:6] = torch.from_numpy(rotvec)
    _, joints = lbs(
        torch.zeros(1, 400, dtype=torch.float64),
        pose,
        tensors["v_template"],
        tensors["shapedirs"],
        tensors["posedirs"].reshape(-1, 36).T,
        tensors["J_regressor"],
        parents,
        tensors["weights"],
    )
    rest = model["J_regressor"] @ model["v_template"]
    expected = (rest - rest[1]) @ _rotation(rotvec).T + rest[1]
    np.testing.assert_allclose(joints[0, 1:].numpy(), expected[1:], atol=1e-12)
    np.testing.assert_allclose(joints[0, 0].numpy(), rest[0], atol=1e-12)


def test_landmarks_are_barycentric_combinations(flame64, assets):
    _, model, embedding = assets
    rng = np.random.default_rng(2)
    shape = torch.from_numpy(rng.normal(size=(2, 300)))
    vertices = flame64(shape)
    got = flame64.landmarks68(vertices).numpy()
    full = flame64.full_landmarks68(vertices).numpy()

    faces_idx = np.concatenate([embedding["dynamic_lmk_faces_idx"][0], embedding["static_lmk_faces_idx"]])
    bary = np.concatenate([embedding["dynamic_lmk_bary_coords"][0], embedding["static_lmk_bary_coords"]])
    assert np.all(bary >= -1e-6) and np.allclose(bary.sum(axis=1), 1.0, atol=1e-6)  # points inside faces
    for b in range(2):
        verts = vertices[b].numpy()
        manual = np.array(
            [sum(bary[l, k] * verts[model["f"][faces_idx[l], k]] for k in range(3)) for l in range(68)]
        )
        np.testing.assert_allclose(got[b], manual, atol=1e-7)  # bary stored as float32 in the file
    np.testing.assert_allclose(full, got, atol=1e-7)  # the synthetic full table is the frontal one
    np.testing.assert_allclose(flame64.landmarks7(vertices).numpy(), got[:, NOW_LANDMARKS])


def test_contour_table_row_layout():
    yaw = torch.tensor([0.0, 0.4, -10.0, 10.0, 25.0, -39.0, 39.6, -60.0, 90.0])
    # row a for a = round(-yaw) >= 0, row 39 - a for a < 0, a clamped to [-39, 39]
    assert contour_table_row(yaw).tolist() == [0, 0, 10, 49, 64, 39, 78, 39, 78]


def test_head_yaw_is_the_middle_zyx_euler_angle_of_global_times_neck(flame64):
    rng = np.random.default_rng(3)
    pose, neck = rng.normal(size=(8, 3)) * 0.4, rng.normal(size=(8, 3)) * 0.4
    chain = Rotation.from_rotvec(pose) * Rotation.from_rotvec(neck)
    expected = chain.as_euler("ZYX", degrees=True)[:, 1]
    got = flame64.head_yaw_degrees(torch.from_numpy(pose), torch.from_numpy(neck)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_contour_follows_the_yaw_of_global_and_neck(flame64, assets):
    _, _, embedding = assets
    zeros = torch.zeros(1, 300, dtype=torch.float64)
    pose = torch.tensor([[0.0, np.deg2rad(20.0), 0.0]], dtype=torch.float64)
    neck = torch.tensor([[0.0, np.deg2rad(5.2), 0.0]], dtype=torch.float64)
    vertices = flame64(zeros, pose=pose, neck=neck)
    got = flame64.landmarks68(vertices, pose=pose, neck=neck)
    row = 39 + 25  # yaw 25.2 degrees -> a = -25
    expected = vertices2landmarks(
        vertices,
        flame64.faces,
        torch.from_numpy(embedding["dynamic_lmk_faces_idx"][row][None]),
        torch.from_numpy(embedding["dynamic_lmk_bary_coords"][row][None]),
    )
    np.testing.assert_allclose(got[:, :17].numpy(), expected.numpy(), atol=1e-7)
    frontal = flame64.landmarks68(vertices)  # same mesh, but the table row for zero yaw
    assert not torch.allclose(frontal[:, :17], got[:, :17])
    torch.testing.assert_close(frontal[:, 17:], got[:, 17:])


def test_batch_of_one_and_of_64_agree(assets):
    paths, _, _ = assets
    flame = FLAME(paths.model, n_shape=100, n_exp=50, landmark_embedding_path=paths.landmarks)
    generator = torch.Generator().manual_seed(4)
    inputs = {
        "shape": torch.randn(64, 100, generator=generator),
        "expression": torch.randn(64, 50, generator=generator),
        "jaw": torch.rand(64, 3, generator=generator) * 0.2,
        "pose": torch.randn(64, 3, generator=generator) * 0.3,
        "neck": torch.randn(64, 3, generator=generator) * 0.2,
        "eyes": torch.randn(64, 6, generator=generator) * 0.2,
    }
    with torch.no_grad():
        batched = flame(**inputs)
        batched_lmk = flame.landmarks68(batched, inputs["pose"], inputs["neck"])
        for i in (0, 17, 63):
            single = flame(**{key: value[i : i + 1] for key, value in inputs.items()})
            torch.testing.assert_close(single[0], batched[i], atol=1e-6, rtol=0)
            single_lmk = flame.landmarks68(single, inputs["pose"][i : i + 1], inputs["neck"][i : i + 1])
            torch.testing.assert_close(single_lmk[0], batched_lmk[i], atol=1e-6, rtol=0)


def test_float32_default_and_input_checks(assets):
    paths, _, _ = assets
    flame = FLAME(paths.model)
    assert flame.faces.dtype == torch.long and flame.faces.shape[1] == 3
    assert flame.num_vertices == flame.v_template.shape[0]
    vertices = flame(torch.zeros(2, 300))
    assert vertices.shape == (2, flame.num_vertices, 3) and vertices.dtype == torch.float32
    with pytest.raises(ValueError, match="'expression' must have shape"):
        flame(torch.zeros(2, 300), expression=torch.zeros(2, 99))
    with pytest.raises(ValueError, match="'shape'"):
        flame(torch.zeros(300))
    with pytest.raises(RuntimeError, match="landmark_embedding_path"):
        flame.landmarks68(vertices)
    with pytest.raises(ValueError, match="n_exp=101"):
        FLAME(paths.model, n_exp=101)
    with pytest.raises(ValueError, match="n_shape=301"):
        FLAME(paths.model, n_shape=301)


@pytest.mark.gpu
def test_cuda_matches_cpu(assets):
    paths, _, _ = assets
    flame = FLAME(paths.model, landmark_embedding_path=paths.landmarks)
    shape, pose = torch.randn(4, 300) * 0.5, torch.randn(4, 3) * 0.3
    cpu = flame.landmarks68(flame(shape, pose=pose), pose)
    flame = flame.cuda()
    gpu = flame.landmarks68(flame(shape.cuda(), pose=pose.cuda()), pose.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_front_face_rule_on_a_sphere():
    import trimesh  # here, not at module level: the gpu tests of this file need only torch

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    vertices, faces = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    # a large box keeps every vertex; the normal test then keeps exactly the forward-facing half
    everything = front_face_indices(vertices, radius=10.0, depth=10.0)
    assert len(everything) == len(vertices)
    facing = front_face_indices(vertices, faces, radius=10.0, depth=10.0)
    clear = np.abs(vertices[:, 2]) > 1e-3
    np.testing.assert_array_equal(np.isin(np.flatnonzero(clear), facing), vertices[clear, 2] > 0)
    # default rule: z within 0.45 * width (0.09) of the tip (0.1), xy within 0.1 of (0, -0.02)
    default = front_face_indices(vertices)
    chosen = vertices[default]
    assert np.all(chosen[:, 2] >= 0.1 - 0.09 - 1e-12)
    assert np.all(np.linalg.norm(chosen[:, :2] - [0.0, -0.02], axis=1) <= 0.1 + 1e-12)
    assert np.argmax(vertices[:, 2]) in default
