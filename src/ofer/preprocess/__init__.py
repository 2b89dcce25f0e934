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
and `cli` (`python -m ofer.preprocess`). The names below are the public API.
"""

from ofer.preprocess.alignment import (
    ARCFACE_TEMPLATE,
    FACE_BOX_IN_TEMPLATE,
    FARL_BOX_SCALE,
    arcface_matrix_224_to_112,
    box_from_keypoints,
    compose_affine,
    farl_matrix,
    five_keypoints,
    similarity_transform,
    transform_points,
    typical_arcface_matrix,
)
from ofer.preprocess.batch import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, list_images, run
from ofer.preprocess.cli import main
from ofer.preprocess.crops import (
    PreparedFace,
    arcface_crop,
    arcface_input,
    arcface_to_bgr,
    farl_crop,
    inside_fraction,
    prepare_face,
)
from ofer.preprocess.detectors import DETECTORS, InsightFaceDetector, make_detector, pick_face
from ofer.preprocess.keypoint_files import KeypointEntry, load_keypoints, lookup_keypoints
from ofer.preprocess.mtcnn import MTCNNDetector

__all__ = [
    "ARCFACE_TEMPLATE",
    "DETECTORS",
    "FACE_BOX_IN_TEMPLATE",
    "FARL_BOX_SCALE",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "InsightFaceDetector",
    "KeypointEntry",
    "MTCNNDetector",
    "PreparedFace",
    "arcface_crop",
    "arcface_input",
    "arcface_matrix_224_to_112",
    "arcface_to_bgr",
    "box_from_keypoints",
    "compose_affine",
    "farl_crop",
    "farl_matrix",
    "five_keypoints",
    "inside_fraction",
    "list_images",
    "load_keypoints",
    "lookup_keypoints",
    "main",
    "make_detector",
    "pick_face",
    "prepare_face",
    "run",
    "similarity_transform",
    "transform_points",
    "typical_arcface_matrix",
]
