"""The FLAME head model as a thin ``nn.Module`` over the pure functions in :mod:`ofer.flame.lbs`.

FLAME maps identity shape β, expression ψ and the pose of 5 joints (global, neck, jaw, left
eye, right eye; axis-angle) to a 3D head mesh in metres, in the FLAME frame (x to the
subject's left, y up, z out of the face). The class only loads the assets, keeps them as
buffers (so ``.to(device)`` and ``.double()`` move them) and calls ``lbs``. It also gives the
68 iBUG landmarks (51 static + 17 yaw-dependent contour points) and the 7 NoW landmarks.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from ofer.flame.lbs import batch_rodrigues, lbs, vertices2landmarks
from ofer.flame.safe_pickle import load_flame_model, load_landmark_embedding
from ofer.io import InputError

NUM_IDENTITY_COLUMNS = 300  # FLAME files hold 300 identity columns, then the expression ones
NOW_LANDMARKS = [36, 39, 42, 45, 33, 48, 54]  # iBUG-68 indices of the 7 NoW landmarks
MAX_CONTOUR_YAW = 39  # the dynamic contour table covers whole degrees in [-39, 39]


def contour_table_row(yaw_degrees: torch.Tensor) -> torch.Tensor:
    """Row of FLAME's dynamic contour table for a head yaw (B,) in degrees -> (B,) long.

    The real ``landmark_embedding.npy`` indexes its 79 rows by a = round(-yaw) clamped to
    [-39, 39]: row a for a >= 0 and row 39 - a for a < 0 (so rows 40..78 hold a = -1..-39).
    """
    angle = torch.round(torch.clamp(-yaw_degrees, -MAX_CONTOUR_YAW, MAX_CONTOUR_YAW)).long()
    return torch.where(angle >= 0, angle, MAX_CONTOUR_YAW - angle)


class FLAME(nn.Module):
    """FLAME: (shape, expression, jaw, global pose, neck, eyes) -> vertices (B,V,3) in metres.

    Args:
        model_path: FLAME 2020 ``generic_model.pkl`` or a FLAME 2023 pickle.
        n_shape: identity coefficients used (the first ``n_shape`` of the file's 300).
        n_exp: expression coefficients used (the first ``n_exp`` after the identity ones).
        landmark_embedding_path: ``landmark_embedding.npy``; needed for the landmark methods.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        n_shape: int = 300,
        n_exp: int = 100,
        landmark_embedding_path: Optional[str | os.PathLike] = None,
    ) -> None:
        super().__init__()
        model = load_flame_model(model_path)
        shapedirs = model["shapedirs"]  # (V,3,K)
        available_exp = shapedirs.shape[-1] - NUM_IDENTITY_COLUMNS
        if not 1 <= n_shape <= NUM_IDENTITY_COLUMNS or shapedirs.shape[-1] < NUM_IDENTITY_COLUMNS:
            raise InputError(f"{model_path}: n_shape={n_shape} but the file has {shapedirs.shape[-1]} shape columns")
        if not 0 <= n_exp <= available_exp:
            raise InputError(f"{model_path}: n_exp={n_exp} but the file has {available_exp} expression columns")
        self.n_shape, self.n_exp = n_shape, n_exp
        self.num_vertices = model["v_template"].shape[0]

        parents = model["kintree_table"][0].copy()
        parents[0] = -1  # the file stores the root's parent as 2**32 - 1
        if np.any(parents[1:] >= np.arange(1, len(parents))) or np.any(parents[1:] < 0):
            raise InputError(f"{model_path}: key 'kintree_table' is not a tree listed parents-first: {parents}")

        shapedirs = np.concatenate(
            [shapedirs[..., :n_shape], shapedirs[..., NUM_IDENTITY_COLUMNS : NUM_IDENTITY_COLUMNS + n_exp]], axis=-1
        )  # (V,3,n_shape+n_exp)
        posedirs = model["posedirs"].reshape(self.num_vertices * 3, -1).T  # (36, V*3)

        def floats(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)

        self.register_buffer("v_template", floats(model["v_template"]))
        self.register_buffer("shapedirs", floats(shapedirs))
        self.register_buffer("posedirs", floats(posedirs))
        self.register_buffer("J_regressor", floats(model["J_regressor"]))
        self.register_buffer("lbs_weights", floats(model["weights"]))
        self.register_buffer("parents", torch.as_tensor(parents, dtype=torch.long))
        self.register_buffer("faces", torch.as_tensor(model["f"], dtype=torch.long))

        self.has_landmarks = landmark_embedding_path is not None
        if self.has_landmarks:
            embedding = load_landmark_embedding(landmark_embedding_path)
            num_faces = model["f"].shape[0]
            for key, value in embedding.items():
                value = value[0] if key.startswith("full_") else value  # (1,68,...) -> (68,...)
                if key.endswith("faces_idx"):
                    if value.min() < 0 or value.max() >= num_faces:
                        raise InputError(
                            f"{landmark_embedding_path}: key '{key}' indexes faces outside [0, {num_faces}) "
                            f"of {model_path} (landmarks for another FLAME topology?)"
                        )
                    self.register_buffer(key, torch.as_tensor(value, dtype=torch.long))
                else:
                    self.register_buffer(key, floats(value))

    def _param(self, name: str, value: Optional[torch.Tensor], batch: int, size: int) -> torch.Tensor:
        """A (B,size) parameter in the model's dtype; zeros when not given."""
        if value is None:
            return self.v_template.new_zeros(batch, size)
        if value.shape != (batch, size):
            raise ValueError(f"FLAME: '{name}' must have shape ({batch}, {size}), got {tuple(value.shape)}")
        return value.to(self.v_template.dtype)

    def forward(
        self,
        shape: torch.Tensor,
        expression: Optional[torch.Tensor] = None,
        jaw: Optional[torch.Tensor] = None,
        pose: Optional[torch.Tensor] = None,
        neck: Optional[torch.Tensor] = None,
        eyes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Vertices (B,V,3) in metres.

        Args: shape (B,n_shape); expression (B,n_exp); jaw (B,3); pose (B,3) global rotation;
        neck (B,3); eyes (B,6) left then right eye. All axis-angle; missing inputs are zeros.
        """
        if shape.dim() != 2:
            raise ValueError(f"FLAME: 'shape' must be (B, {self.n_shape}), got {tuple(shape.shape)}")
        batch = shape.shape[0]
        betas = torch.cat(
            [
                self._param("shape", shape, batch, self.n_shape),
                self._param("expression", expression, batch, self.n_exp),
            ],
            dim=1,
        )  # (B, n_shape + n_exp)
        full_pose = torch.cat(
            [
                self._param("pose", pose, batch, 3),
                self._param("neck", neck, batch, 3),
                self._param("jaw", jaw, batch, 3),
                self._param("eyes", eyes, batch, 6),
            ],
            dim=1,
        )  # (B,15): [global 0:3, neck 3:6, jaw 6:9, eyes 9:15]
        vertices, _ = lbs(
            betas,
            full_pose,
            self.v_template,
            self.shapedirs,
            self.posedirs,
            self.J_regressor,
            self.parents,
            self.lbs_weights,
        )
        return vertices

    def _require_landmarks(self) -> None:
        if not self.has_landmarks:
            raise RuntimeError("FLAME was built without landmark_embedding_path; landmarks are unavailable")

    def head_yaw_degrees(self, pose: torch.Tensor, neck: torch.Tensor) -> torch.Tensor:
        """Yaw (rotation about y, degrees) of the chain global·neck; pose, neck (B,3) -> (B,)."""
        rotations = batch_rodrigues(torch.cat([pose, neck], dim=0))  # (2B,3,3)
        chain = rotations[: pose.shape[0]] @ rotations[pose.shape[0] :]  # (B,3,3)
        yaw = torch.atan2(-chain[:, 2, 0], torch.hypot(chain[:, 0, 0], chain[:, 1, 0]))
        return torch.rad2deg(yaw)

    def landmarks68(
        self, vertices: torch.Tensor, pose: Optional[torch.Tensor] = None, neck: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """iBUG-68 landmarks (B,68,3) of vertices (B,V,3) posed with global ``pose`` and ``neck`` (B,3).

        Points 0:17 are the face contour, chosen from the dynamic table by the head yaw so that
        they follow the silhouette; points 17:68 are the static landmarks.
        """
        self._require_landmarks()
        batch = vertices.shape[0]
        row = contour_table_row(
            self.head_yaw_degrees(self._param("pose", pose, batch, 3), self._param("neck", neck, batch, 3))
        )  # (B,)
        faces_idx = torch.cat(
            [self.dynamic_lmk_faces_idx[row], self.static_lmk_faces_idx.expand(batch, -1)], dim=1
        )  # (B,68)
        bary = torch.cat(
            [self.dynamic_lmk_bary_coords[row], self.static_lmk_bary_coords.expand(batch, -1, -1)], dim=1
        )  # (B,68,3)
        return vertices2landmarks(vertices, self.faces, faces_idx, bary.to(vertices.dtype))

    def landmarks7(
        self, vertices: torch.Tensor, pose: Optional[torch.Tensor] = None, neck: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The 7 NoW landmarks (B,7,3): eye corners, nose bottom, mouth corners."""
        return self.landmarks68(vertices, pose, neck)[:, NOW_LANDMARKS]

    def full_landmarks68(self, vertices: torch.Tensor) -> torch.Tensor:
        """iBUG-68 landmarks (B,68,3) from the file's fixed ``full_lmk_*`` embedding (no yaw)."""
        self._require_landmarks()
        batch = vertices.shape[0]
        return vertices2landmarks(
            vertices,
            self.faces,
            self.full_lmk_faces_idx.expand(batch, -1),
            self.full_lmk_bary_coords.expand(batch, -1, -1).to(vertices.dtype),
        )


def front_face_indices(
    v_template: np.ndarray,
    faces: Optional[np.ndarray] = None,
    radius: float = 0.5,
    depth: float = 0.45,
    centre_drop: float = 0.1,
) -> np.ndarray:
    """Front-face vertex indices of any head mesh in the FLAME frame, by a geometric rule.

    With w the head width (extent in x) and the nose tip taken as the vertex of largest z,
    a vertex belongs to the front face when:
      1. it lies within ``radius``·w in the xy-plane of the face centre, the point
         ``centre_drop``·w below the nose tip (the nose sits above the middle of the face);
      2. it is no more than ``depth``·w behind the nose tip in z;
      3. if ``faces`` (F,3) are given, its area-weighted vertex normal points forward (n_z > 0),
         which drops back-facing surfaces inside that box.
    Returns the sorted indices (int64). The released OFER ``frontindices.npy`` (1785 indices of
    the FLAME 2020 topology) should be used when available; this rule serves other topologies.
    """
    vertices = np.asarray(v_template, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"front_face_indices: v_template must be (V,3), got {vertices.shape}")
    width = np.ptp(vertices[:, 0])
    nose_tip = vertices[np.argmax(vertices[:, 2])]
    centre_xy = nose_tip[:2] - np.array([0.0, centre_drop * width])
    keep = np.linalg.norm(vertices[:, :2] - centre_xy, axis=1) <= radius * width
    keep &= vertices[:, 2] >= nose_tip[2] - depth * width
    if faces is not None:
        faces = np.asarray(faces, dtype=np.int64)
        corners = vertices[faces]  # (F,3,3)
        face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # area-weighted
        normals = np.zeros_like(vertices)
        for corner in range(3):
            np.add.at(normals, faces[:, corner], face_normals)
        keep &= normals[:, 2] > 0
    return np.flatnonzero(keep).astype(np.int64)
