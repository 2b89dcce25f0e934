"""Preprocessing of raw photos: face crops and the ArcFace input (specification §9).

For each photo we need two crops of one face:

- the ArcFace crop: the 5 facial keypoints (left eye, right eye, nose tip, left and right
  mouth corner, in image terms) are mapped by a least-squares similarity onto the fixed
  ArcFace template and the photo is warped to 112×112 (what insightface's `norm_crop` does);
  it is stored as the encoder's input array, RGB CHW float32 in [-1, 1] (`.npy`);
- the FaRL crop: a square centred on the face box, 1.6 × the box's mean side, warped to
  224×224 and stored as an image (`.jpg`).

One module per concern: `alignment` (template, similarity fits, boxes), `crops` (the two
warps and the ArcFace input), `mtcnn` and `detectors` (finding the face), `keypoint_files`
(keypoints given by the user), `batch` (a folder of photos, guarded per photo, with a report)
and `cli` (`python -m ofer.preprocess`). The names below are
the public API; they are imported on first use, so that `python -m ofer.preprocess` can take
over SIGTERM before OpenCV and torch load.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "alignment": (
        "ARCFACE_TEMPLATE", "FACE_BOX_IN_TEMPLATE", "FARL_BOX_SCALE", "arcface_matrix_224_to_112",
        "box_from_keypoints", "compose_affine", "farl_matrix", "five_keypoints", "similarity_transform",
        "transform_points", "typical_arcface_matrix",
    ),
    "batch": ("IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "crop_photo", "list_images", "run"),
    "cli": ("main",),
    "crops": (
        "PreparedFace", "arcface_crop", "arcface_input", "arcface_to_bgr", "farl_crop", "inside_fraction",
        "prepare_face",
    ),
    "detectors": ("DETECTORS", "InsightFaceDetector", "make_detector", "pick_face", "plausible_faces"),
    "keypoint_files": ("KeypointEntry", "load_keypoints", "lookup_keypoints"),
    "mtcnn": ("MTCNNDetector",),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = [name for names in _PUBLIC.values() for name in names]


def __getattr__(name: str) -> Any:
    """Import the public name's module on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
