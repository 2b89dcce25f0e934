"""Linear blend skinning for FLAME as pure tensor functions.

The model class (:mod:`ofer.flame.flame`) only loads assets and calls these. Shapes use
B = batch, V = vertices, J = joints, K = blend-shape coefficients, L = landmarks.
The maths is the standard SMPL/FLAME formulation: shape blend shapes, joint regression,
pose-corrective blend shapes from (R - I) of the non-root joints, forward kinematics, skinning.
"""

from __future__ import annotations

import math

import torch


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors (N,3) -> rotation matrices (N,3,3).

    R = I + sin(t)/t K + (1 - cos t)/t^2 K^2, with K the cross-product matrix of the (not
    normalised) vector and t its norm. Both coefficients are written with ``sinc``, so the
    result is exactly I at t = 0, accurate for tiny angles and differentiable everywhere.
    """
    if rot_vecs.dim() != 2 or rot_vecs.shape[1] != 3:
        raise ValueError(f"batch_rodrigues expects (N,3) axis-angle vectors, got {tuple(rot_vecs.shape)}")
    angle = torch.linalg.vector_norm(rot_vecs, dim=1)[:, None, None]  # (N,1,1)
    sin_term = torch.sinc(angle / math.pi)  # sin(t)/t
    cos_term = 0.5 * torch.sinc(angle / (2 * math.pi)) ** 2  # (1-cos t)/t^2 = 2 sin^2(t/2)/t^2
    x, y, z = rot_vecs.unbind(dim=1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)  # (N,3,3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)
    return eye + sin_term * skew + cos_term * (skew @ skew)


def blend_shapes(betas: torch.Tensor, shape_disps: torch.Tensor) -> torch.Tensor:
    """Coefficients (B,K) and displacement bases (V,3,K) -> vertex offsets (B,V,3)."""
    return torch.einsum("bk,vck->bvc", betas, shape_disps)


def vertices2joints(J_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Joint regressor (J,V) and vertices (B,V,3) -> joint locations (B,J,3)."""
    return torch.einsum("jv,bvc->bjc", J_regressor, vertices)


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kinematics along the kinematic tree.

    Args:
        rot_mats: (B,J,3,3) local rotation of each joint.
        joints: (B,J,3) rest-pose joint locations.
        parents: (J,) parent index of each joint, parents[0] = -1, parents[j] < j.
    Returns:
        posed_joints (B,J,3) and rel_transforms (B,J,4,4): the world transform of each joint
        composed with the translation by -rest_joint, i.e. the map a rest-pose vertex
        rigidly attached to that joint undergoes.
    """
    parent_list = parents.tolist()
    offsets = joints.clone()  # (B,J,3) each joint relative to its parent
    offsets[:, 1:] = joints[:, 1:] - joints[:, parent_list[1:]]
    local = torch.cat([rot_mats, offsets.unsqueeze(-1)], dim=-1)  # (B,J,3,4)
    bottom = local.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*local.shape[:2], 1, 4)
    local = torch.cat([local, bottom], dim=-2)  # (B,J,4,4)

    world = [local[:, 0]]
    for joint in range(1, len(parent_list)):
        world.append(world[parent_list[joint]] @ local[:, joint])
    world_transforms = torch.stack(world, dim=1)  # (B,J,4,4)

    posed_joints = world_transforms[..., :3, 3]
    rest_offset = (world_transforms[..., :3, :3] @ joints.unsqueeze(-1)).squeeze(-1)  # (B,J,3)
    rel_transforms = world_transforms.clone()
    rel_transforms[..., :3, 3] = posed_joints - rest_offset
    return posed_joints, rel_transforms


def lbs(
    betas: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    J_regressor: torch.Tensor,
    parents: torch.Tensor,
    lbs_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape, pose and skin a template mesh.

    Args:
        betas: (B,K) blend-shape coefficients (FLAME: identity then expression).
        pose: (B,J*3) axis-angle per joint, root first.
        v_template: (V,3) template vertices.
        shapedirs: (V,3,K) blend-shape displacements.
        posedirs: ((J-1)*9, V*3) pose-corrective displacements, rows ordered like the
            flattened (J-1,3,3) matrices R - I of the non-root joints.
        J_regressor: (J,V) joint regressor.
        parents: (J,) kinematic tree, parents[0] = -1.
        lbs_weights: (V,J) skinning weights.
    Returns:
        vertices (B,V,3) and posed joints (B,J,3).
    """
    batch = betas.shape[0]
    v_shaped = v_template + blend_shapes(betas, shapedirs)  # (B,V,3)
    rest_joints = vertices2joints(J_regressor, v_shaped)  # (B,J,3)

    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(batch, -1, 3, 3)  # (B,J,3,3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(batch, -1)  # (B,(J-1)*9)
    v_posed = v_shaped + (pose_feature @ posedirs).view(batch, -1, 3)  # (B,V,3)

    posed_joints, rel_transforms = batch_rigid_transform(rot_mats, rest_joints, parents)
    blended = torch.einsum("vj,bjmn->bvmn", lbs_weights, rel_transforms[:, :, :3])  # (B,V,3,4)
    vertices = torch.einsum("bvmn,bvn->bvm", blended[..., :3], v_posed) + blended[..., 3]
    return vertices, posed_joints


def vertices2landmarks(
    vertices: torch.Tensor, faces: torch.Tensor, lmk_faces_idx: torch.Tensor, lmk_bary_coords: torch.Tensor
) -> torch.Tensor:
    """Barycentric landmarks on a mesh.

    Args:
        vertices: (B,V,3); faces: (F,3) long; lmk_faces_idx: (B,L) long face index per
        landmark; lmk_bary_coords: (B,L,3) barycentric weights of the face's three vertices.
    Returns:
        (B,L,3) landmark positions.
    """
    batch = vertices.shape[0]
    corner_idx = faces[lmk_faces_idx]  # (B,L,3) vertex indices
    batch_idx = torch.arange(batch, device=vertices.device).view(batch, 1, 1)
    corners = vertices[batch_idx, corner_idx]  # (B,L,3 corners,3 xyz)
    return torch.einsum("blk,blkc->blc", lmk_bary_coords, corners)
