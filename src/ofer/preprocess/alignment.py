"""Alignment geometry: the ArcFace template, similarity fits and the face boxes of the two crops.

Everything here is pure 2-D geometry on keypoints and boxes (no pixels): the similarity that
takes 5 facial keypoints onto the ArcFace template (what insightface's `norm_crop` fits, with
the same library, scikit-image), the square FaRL box around a face box, and the maps between
the two crops that the occlusion augmentation needs.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from ofer.encoders.normalise import FARL_SIZE

# ArcFace alignment template in 112×112 crop pixels: left eye, right eye, nose tip,
# left mouth corner, right mouth corner (left/right in image terms).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# Side of the FaRL crop square relative to the mean side of the face box.
FARL_BOX_SCALE = 1.6

# A typical face-detector box expressed in ArcFace-template coordinates (x1, y1, x2, y2).
# Measured (ours) from MTCNN boxes of upright faces aligned to the template: the box spans
# about 80 × 98 template pixels around (56, 64), from the forehead to just below the chin.
FACE_BOX_IN_TEMPLATE = np.array([16.0, 15.0, 96.0, 113.0])


def five_keypoints(landmarks68: np.ndarray) -> np.ndarray:
    """The 5 ArcFace keypoints from iBUG-68 landmarks (2D or 3D): (68, d) -> (5, d).

    In template order: image-left eye centre, image-right eye centre, nose tip, mouth corners.
    """
    return np.stack([landmarks68[36:42].mean(0), landmarks68[42:48].mean(0), landmarks68[30], landmarks68[48],
                     landmarks68[54]])


def check_points(points: np.ndarray, name: str, count: int | None = None) -> np.ndarray:
    """Return `points` as a finite float64 (K, 2) array or raise ValueError naming `name`."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or (count is not None and points.shape[0] != count):
        want = f"({count}, 2)" if count is not None else "(K, 2)"
        raise ValueError(f"{name} must have shape {want}, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} contains non-finite values")
    return points


def check_box(box: np.ndarray) -> np.ndarray:
    """Return `box` as a finite float64 (4,) array x1, y1, x2, y2 with x2 > x1, y2 > y1."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"face box must be 4 finite numbers x1, y1, x2, y2, got {box.tolist()}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"face box must have x2 > x1 and y2 > y1, got {box.tolist()}")
    return box


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking `src` to `dst`.

    scikit-image's `SimilarityTransform` (Umeyama's closed form, reflections excluded), the
    estimator insightface's `norm_crop` uses, with our input checks.

    Args:
        src: (K, 2) points, K >= 2, not all equal.
        dst: (K, 2) corresponding points.
    Returns:
        (2, 3) float64 affine matrix [c R | t], usable with `cv2.warpAffine`.
    """
    src = check_points(src, "src")
    dst = check_points(dst, "dst", src.shape[0])
    if src.shape[0] < 2:
        raise ValueError("similarity_transform needs at least 2 point pairs")
    if np.ptp(src, axis=0).max() == 0:
        raise ValueError("similarity_transform: all source points coincide")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok:
        raise ValueError(f"similarity_transform: no similarity fits these points ({tform})")
    return np.asarray(tform.params[:2], dtype=np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (K, 2) points; returns (K, 2) float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(2, 3) matrix of `outer ∘ inner` (apply `inner` first)."""
    linear = outer[:, :2] @ inner[:, :2]
    translation = outer[:, :2] @ inner[:, 2] + outer[:, 2]
    return np.concatenate([linear, translation[:, None]], axis=1)


def arcface_matrix_224_to_112(m224: np.ndarray, m112: np.ndarray) -> np.ndarray:
    """(2, 3) matrix taking FaRL-crop (224) pixel coordinates to ArcFace-crop (112) ones.

    Both crops come from one photo: `m224` and `m112` map photo pixels to each crop, so the
    result is m112 ∘ m224⁻¹. The occlusion augmentation uses it to draw one occluder on both.
    """
    return compose_affine(
        np.asarray(m112, np.float64), cv2.invertAffineTransform(np.asarray(m224, np.float64))
    )


def farl_matrix(box: np.ndarray) -> np.ndarray:
    """(2, 3) similarity taking photo pixels to the 224 FaRL crop of a face box.

    The square is centred on the box centre with side = 1.6 × mean(box width, box height);
    its top-left corner maps to pixel (0, 0) and the scale is 224 / side.
    """
    x1, y1, x2, y2 = check_box(box)
    side = FARL_BOX_SCALE * ((x2 - x1) + (y2 - y1)) / 2
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    scale = FARL_SIZE / side
    return np.array([[scale, 0.0, -scale * (centre_x - side / 2)], [0.0, scale, -scale * (centre_y - side / 2)]])


def typical_arcface_matrix() -> np.ndarray:
    """(2, 3) map from 224-crop pixels to 112 ArcFace-crop pixels for a typical face.

    For data saved without its alignment (the MICA layout stores only the two crops), this
    places the same region in both crops: the face box sits at `FACE_BOX_IN_TEMPLATE` in
    the ArcFace crop, and the 224 crop is the FaRL square around that box.
    """
    return cv2.invertAffineTransform(farl_matrix(FACE_BOX_IN_TEMPLATE))


def box_from_keypoints(kps5: np.ndarray) -> np.ndarray:
    """An approximate face-detector box (4,) x1, y1, x2, y2 from 5 keypoints.

    For the path without a detector: the typical detector box in ArcFace-template
    coordinates (`FACE_BOX_IN_TEMPLATE`) is mapped back to the photo through the inverse of
    the keypoints' alignment, and the axis-aligned bounds of its four corners are returned.
    This is an approximation of what SCRFD would give (a few percent in size and position);
    pass the detector's box when you have it.
    """
    to_photo = cv2.invertAffineTransform(similarity_transform(check_points(kps5, "kps5", 5), ARCFACE_TEMPLATE))
    x1, y1, x2, y2 = FACE_BOX_IN_TEMPLATE
    corners = transform_points(to_photo, np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))  # (4, 2)
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])
