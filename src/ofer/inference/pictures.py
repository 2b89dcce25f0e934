"""The two pictures test.py writes per image: the best shape over the input, and the samples.

Both are drawn by `ofer.render` on the CPU; bench/pictures_speed.py times them.
"""

from __future__ import annotations

import numpy as np

from ofer.inference.pipeline import Reconstruction
from ofer.preprocess import ARCFACE_TEMPLATE, arcface_to_bgr, five_keypoints, similarity_transform, transform_points
from ofer.render import flame_to_camera, frontal_view, image_grid, perspective_project, render_mesh

OVERLAY_LABELS = ("input (aligned crop)", "best shape")
# Camera distance the overlay assumes (mm): a portrait taken at arm's length, as the synthetic photos.
VIEW_DISTANCE_MM = 550.0


def place_on_crop(vertices_mm: np.ndarray, kpt5_mm: np.ndarray, template: np.ndarray,
                  distance_mm: float = VIEW_DISTANCE_MM) -> np.ndarray:
    """Screen vertices (V, 3) of a FLAME mesh drawn where the aligned crop shows the face.

    The crop was made by the similarity that takes the photo's five keypoints nearest to
    the ArcFace template; the mesh is placed the same way: viewed from the front at
    `distance_mm` (perspective, so the keypoints in front are magnified against the head's
    outline as in a photo), then moved by the similarity that takes its five projected
    keypoints (5, 3) nearest to `template` (5, 2). Fitting a general camera to the five
    points instead shears and stretches the head (head pose is not recoverable from
    template positions alone: the crop's alignment removed it).
    """
    offset = np.array([0.0, 0.0, -distance_mm])
    screen = perspective_project(flame_to_camera(vertices_mm, np.eye(3), offset), 1.0, 0.0, 0.0)  # (V, 3)
    kpt5 = perspective_project(flame_to_camera(kpt5_mm, np.eye(3), offset), 1.0, 0.0, 0.0)[:, :2]
    similarity = similarity_transform(kpt5, template)  # (2, 3) [c R | t]
    scale = np.sqrt(abs(np.linalg.det(similarity[:, :2])))
    return np.c_[transform_points(similarity, screen[:, :2]), scale * screen[:, 2]]


def overlay_picture(arcface: np.ndarray, rec: Reconstruction, faces: np.ndarray, scale: int = 3) -> np.ndarray:
    """Two labelled panels: the aligned ArcFace crop (`scale` times larger), and the best shape over it."""
    crop = arcface_to_bgr(arcface)
    size = crop.shape[0] * scale
    crop = np.ascontiguousarray(np.repeat(np.repeat(crop, scale, 0), scale, 1))
    # Crop pixel (i, j) became the scale x scale block centred at scale * (i, j) + (scale - 1) / 2.
    template = ARCFACE_TEMPLATE * scale + (scale - 1) / 2
    screen = place_on_crop(rec.neutral_mm, five_keypoints(rec.kpt68_mm), template)
    drawn, _ = render_mesh(screen, faces, size, size, background=crop, alpha=0.6)
    return image_grid([crop, drawn], ncols=2, labels=list(OVERLAY_LABELS))


def samples_sheet(rec: Reconstruction, faces: np.ndarray, count: int) -> np.ndarray:
    """Contact sheet: the neutral best shape then up to `count` expression samples."""
    tiles = [frontal_view(rec.neutral_mm, faces)] + [frontal_view(v, faces) for v in rec.expression_mm[:count]]
    labels = ["neutral"] + [f"exp {k}" for k in range(len(tiles) - 1)]
    return image_grid(tiles, ncols=min(len(tiles), 6), labels=labels)
