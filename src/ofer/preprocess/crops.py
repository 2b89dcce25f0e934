"""The two encoder crops of a face: the ArcFace crop (112) and the FaRL crop (224).

Colour convention: images in memory are BGR uint8 (H, W, 3), as OpenCV reads them; only
`arcface_input` converts to RGB. Both warps use bilinear sampling with a constant black
border, exactly like insightface's `norm_crop` (whose crops the ArcFace weights were trained
on); there is no anti-aliasing, so very large photos give slightly aliased crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ofer.encoders.normalise import ARCFACE_SIZE, FARL_SIZE, arcface_normalise
from ofer.preprocess.alignment import (
    ARCFACE_TEMPLATE,
    box_from_keypoints,
    check_box,
    check_points,
    farl_matrix,
    similarity_transform,
    transform_points,
)


def check_image(image_bgr: np.ndarray) -> None:
    """Raise ValueError unless `image_bgr` is a BGR uint8 (H, W, 3) array."""
    if not (
        isinstance(image_bgr, np.ndarray)
        and image_bgr.dtype == np.uint8
        and image_bgr.ndim == 3
        and image_bgr.shape[2] == 3
    ):
        raise ValueError(
            "expected a BGR uint8 image of shape (H, W, 3), got "
            f"{getattr(image_bgr, 'dtype', type(image_bgr))} {getattr(image_bgr, 'shape', '')}"
        )


def _warp(image_bgr: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp to (size, size, 3) with a black border, as insightface's norm_crop."""
    check_image(image_bgr)
    return cv2.warpAffine(
        image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def arcface_crop(image_bgr: np.ndarray, kps5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Align a face to the ArcFace template (insightface `norm_crop` equivalent).

    Args:
        image_bgr: (H, W, 3) uint8 BGR photo.
        kps5: (5, 2) keypoints in photo pixels (left eye, right eye, nose, left/right mouth).
    Returns:
        crop112_bgr (112, 112, 3) uint8 and M (2, 3) mapping photo pixels to crop pixels.
    """
    matrix = similarity_transform(check_points(kps5, "kps5", 5), ARCFACE_TEMPLATE)
    return _warp(image_bgr, matrix, ARCFACE_SIZE), matrix


def arcface_input(crop112_bgr: np.ndarray) -> np.ndarray:
    """The ArcFace network input from a 112×112 BGR crop: RGB, (x − 127.5)/127.5, CHW float32.

    The single definition of the convention, shared by preprocessing and the synthetic data.
    Returns (3, 112, 112) float32 in [-1, 1].
    """
    if np.asarray(crop112_bgr).shape != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
        raise ValueError(f"arcface_input expects a (112, 112, 3) BGR crop, got {np.shape(crop112_bgr)}")
    rgb = np.asarray(crop112_bgr, dtype=np.float32)[:, :, ::-1]  # (112, 112, 3) RGB
    return np.ascontiguousarray(arcface_normalise(rgb).transpose(2, 0, 1), dtype=np.float32)  # (3, 112, 112)


def arcface_to_bgr(arcface: np.ndarray) -> np.ndarray:
    """ArcFace input (3, H, W) float32 -> BGR uint8 (H, W, 3), for pictures (inverse of arcface_input)."""
    rgb = np.clip(np.round(arcface.transpose(1, 2, 0) * 127.5 + 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])


def farl_crop(image_bgr: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square FaRL crop around a face box (see `farl_matrix`), warped to 224×224.

    Outside the photo the crop is black (constant border 0).

    Args:
        image_bgr: (H, W, 3) uint8 BGR photo.
        box: (4,) face box x1, y1, x2, y2 in photo pixels.
    Returns:
        crop224_bgr (224, 224, 3) uint8 and M (2, 3) mapping photo pixels to crop pixels.
    """
    matrix = farl_matrix(box)
    return _warp(image_bgr, matrix, FARL_SIZE), matrix


def inside_fraction(matrix: np.ndarray, size: int, image_shape: tuple[int, ...]) -> float:
    """Fraction of a (size × size) crop's pixels that sample the photo rather than the black border.

    `matrix` (2, 3) maps photo pixels to crop pixels, as returned by the crop functions;
    `image_shape` is the photo's (H, W, ...). Computed from the geometry, without pixels.
    """
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), axis=-1).reshape(-1, 2)  # (size², 2) x, y
    photo = transform_points(cv2.invertAffineTransform(np.asarray(matrix, np.float64)), grid)  # (size², 2)
    height, width = image_shape[:2]
    inside = (photo[:, 0] >= 0) & (photo[:, 0] <= width - 1) & (photo[:, 1] >= 0) & (photo[:, 1] <= height - 1)
    return float(inside.mean())


@dataclass
class PreparedFace:
    """Both encoder crops of one face and how they relate to the photo.

    Attributes:
        crop224: (224, 224, 3) uint8 BGR FaRL crop (saved as `<name>.jpg`).
        crop112: (112, 112, 3) uint8 BGR ArcFace crop.
        arcface: (3, 112, 112) float32 ArcFace input (saved as `<name>.npy`).
        kps5: (5, 2) keypoints in photo pixels.
        box: (4,) face box x1, y1, x2, y2 in photo pixels.
        m224: (2, 3) photo pixels -> 224-crop pixels.
        m112: (2, 3) photo pixels -> 112-crop pixels.
        kps5_in_crop224: (5, 2) keypoints in 224-crop pixels.
    """

    crop224: np.ndarray
    crop112: np.ndarray
    arcface: np.ndarray
    kps5: np.ndarray
    box: np.ndarray
    m224: np.ndarray
    m112: np.ndarray
    kps5_in_crop224: np.ndarray


def prepare_face(image_bgr: np.ndarray, kps5: np.ndarray, box: np.ndarray | None = None) -> PreparedFace:
    """Make both crops of the face given by its 5 keypoints (and box; estimated if None)."""
    kps5 = check_points(kps5, "kps5", 5)
    box = box_from_keypoints(kps5) if box is None else check_box(box)
    crop224, m224 = farl_crop(image_bgr, box)
    crop112, m112 = arcface_crop(image_bgr, kps5)
    return PreparedFace(
        crop224=crop224,
        crop112=crop112,
        arcface=arcface_input(crop112),
        kps5=kps5,
        box=box,
        m224=m224,
        m112=m112,
        kps5_in_crop224=transform_points(m224, kps5),
    )
