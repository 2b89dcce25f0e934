"""Preprocessing of raw photos: face crops and the ArcFace input (specification §9).

For each photo we need two crops of one face:

- the ArcFace crop: the 5 facial keypoints (left eye, right eye, nose tip, left and right
  mouth corner, in image terms) are mapped by a least-squares similarity onto the fixed
  ArcFace template and the photo is warped to 112×112 (what insightface's `norm_crop` does);
  it is stored as the encoder's input array, RGB CHW float32 in [-1, 1] (`.npy`);
- the FaRL crop: a square centred on the face box, 1.6 × the box's mean side, warped to
  224×224 and stored as an image (`.jpg`).

Colour convention: images in memory are BGR uint8 (H, W, 3), as OpenCV reads them; only
`arcface_input` converts to RGB. Both warps use bilinear sampling with a constant black
border, exactly like `norm_crop` (whose crops the ArcFace weights were trained on); there is
no anti-aliasing, so very large photos give slightly aliased crops.

Keypoints come either from insightface's SCRFD detector (optional dependency, user-installed
`antelopev2` model pack) or from a keypoint file (JSON or text). Command line:

    python -m ofer.preprocess --input DIR_OR_LIST --out DIR [--keypoints FILE | --detector-dir DIR]

writes `<out>/<name>.jpg`, `<out>/<name>.npy`, `<out>/list.txt` (processed names) and
`<out>/preprocess_report.json` (processed and failed images with reasons).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from ofer.encoders.normalise import ARCFACE_SIZE, FARL_SIZE, arcface_normalise
from ofer.io import InputError, atomic_write, read_image, save_npy, write_image
from ofer.progress import progress

logger = logging.getLogger(__name__)

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

def five_keypoints(landmarks68: np.ndarray) -> np.ndarray:
    """The 5 ArcFace keypoints from iBUG-68 landmarks (2D or 3D): (68, d) -> (5, d).

    In template order: image-left eye centre, image-right eye centre, nose tip, mouth corners.
    """
    return np.stack([landmarks68[36:42].mean(0), landmarks68[42:48].mean(0), landmarks68[30], landmarks68[48],
                     landmarks68[54]])


# Side of the FaRL crop square relative to the mean side of the face box.
FARL_BOX_SCALE = 1.6

# A typical face-detector box expressed in ArcFace-template coordinates (x1, y1, x2, y2).
# Measured (ours) from MTCNN boxes of upright faces aligned to the template: the box spans
# about 80 × 98 template pixels around (56, 64), from the forehead to just below the chin.
FACE_BOX_IN_TEMPLATE = np.array([16.0, 15.0, 96.0, 113.0])

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_DETECTOR_DIR = Path("pretrained/insightface/models/antelopev2")
INSTALL_HINT = 'pip install "ofer[preprocess]"'


# --------------------------------------------------------------------------- geometry


def _check_points(points: np.ndarray, name: str, count: int | None = None) -> np.ndarray:
    """Return `points` as a finite float64 (K, 2) array or raise ValueError naming `name`."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or (count is not None and points.shape[0] != count):
        want = f"({count}, 2)" if count is not None else "(K, 2)"
        raise ValueError(f"{name} must have shape {want}, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{name} contains non-finite values")
    return points


def _check_box(box: np.ndarray) -> np.ndarray:
    """Return `box` as a finite float64 (4,) array x1, y1, x2, y2 with x2 > x1, y2 > y1."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"face box must be 4 finite numbers x1, y1, x2, y2, got {box.tolist()}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"face box must have x2 > x1 and y2 > y1, got {box.tolist()}")
    return box


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking `src` to `dst`.

    Umeyama's closed form (IEEE TPAMI 1991): minimises sum_k |c R src_k + t - dst_k|^2 over
    rotations R (reflections excluded), scales c > 0 and translations t.

    Args:
        src: (K, 2) points, K >= 2, not all equal.
        dst: (K, 2) corresponding points.
    Returns:
        (2, 3) float64 affine matrix [c R | t], usable with `cv2.warpAffine`.
    """
    src = _check_points(src, "src")
    dst = _check_points(dst, "dst", src.shape[0])
    if src.shape[0] < 2:
        raise ValueError("similarity_transform needs at least 2 point pairs")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var == 0:
        raise ValueError("similarity_transform: all source points coincide")
    covariance = dst_c.T @ src_c / len(src)  # (2, 2)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


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


def _check_image(image_bgr: np.ndarray) -> None:
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
    _check_image(image_bgr)
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
    matrix = similarity_transform(_check_points(kps5, "kps5", 5), ARCFACE_TEMPLATE)
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


def farl_matrix(box: np.ndarray) -> np.ndarray:
    """(2, 3) similarity taking photo pixels to the 224 FaRL crop of a face box (see farl_crop)."""
    x1, y1, x2, y2 = _check_box(box)
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


def farl_crop(image_bgr: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Square FaRL crop around a face box, warped to 224×224.

    The square is centred on the box centre with side = 1.6 × mean(box width, box height);
    its top-left corner maps to pixel (0, 0) and the scale is 224 / side. Outside the photo
    the crop is black (constant border 0).

    Args:
        image_bgr: (H, W, 3) uint8 BGR photo.
        box: (4,) face box x1, y1, x2, y2 in photo pixels.
    Returns:
        crop224_bgr (224, 224, 3) uint8 and M (2, 3) mapping photo pixels to crop pixels.
    """
    matrix = farl_matrix(box)
    return _warp(image_bgr, matrix, FARL_SIZE), matrix


def box_from_keypoints(kps5: np.ndarray) -> np.ndarray:
    """An approximate face-detector box (4,) x1, y1, x2, y2 from 5 keypoints.

    For the path without a detector: the typical detector box in ArcFace-template
    coordinates (`FACE_BOX_IN_TEMPLATE`) is mapped back to the photo through the inverse of
    the keypoints' alignment, and the axis-aligned bounds of its four corners are returned.
    This is an approximation of what SCRFD would give (a few percent in size and position);
    pass the detector's box when you have it.
    """
    to_photo = cv2.invertAffineTransform(
        similarity_transform(_check_points(kps5, "kps5", 5), ARCFACE_TEMPLATE)
    )
    x1, y1, x2, y2 = FACE_BOX_IN_TEMPLATE
    corners = transform_points(to_photo, np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))  # (4, 2)
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])


# --------------------------------------------------------------------------- one face


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
    kps5 = _check_points(kps5, "kps5", 5)
    box = box_from_keypoints(kps5) if box is None else _check_box(box)
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


# --------------------------------------------------------------------------- detector


def pick_face(
    boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray, image_shape: Sequence[int], min_score: float = 0.0
) -> int | None:
    """Index of the detection whose box centre is nearest the image centre, or None.

    Args:
        boxes: (N, 4) x1, y1, x2, y2. scores: (N,). kps: (N, 5, 2) (checked for shape only).
        image_shape: (H, W, ...) of the photo.
        min_score: detections scoring below it are ignored.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes) or np.asarray(kps).reshape(-1, 5, 2).shape[0] != len(boxes):
        raise ValueError(
            f"pick_face: {len(boxes)} boxes, {len(scores)} scores and {np.shape(kps)} keypoints disagree"
        )
    keep = np.flatnonzero(scores >= min_score)
    if keep.size == 0:
        return None
    centres = (boxes[keep, :2] + boxes[keep, 2:]) / 2  # (n, 2) x, y
    image_centre = np.array([image_shape[1], image_shape[0]], dtype=np.float64) / 2
    return int(keep[np.argmin(((centres - image_centre) ** 2).sum(axis=1))])


class InsightFaceDetector:
    """insightface's SCRFD face detector (boxes, scores, 5 keypoints), run on the CPU.

    Needs the optional dependencies (`pip install "ofer[preprocess]"`) and the `antelopev2`
    model pack unpacked by the user into `model_dir` (`scrfd_10g_bnkps.onnx`, or any
    `det_*.onnx` detector such as buffalo_l's `det_10g.onnx`). Nothing is downloaded.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike = DEFAULT_DETECTOR_DIR,
        det_size: int = 224,
        det_thresh: float = 0.5,
    ):
        model_file = self.find_model_file(model_dir)
        try:
            from insightface import model_zoo
        except ImportError as err:
            raise ImportError(
                f"the face detector needs insightface and onnxruntime ({err}); "
                f"install them with: {INSTALL_HINT}"
            ) from err
        self.model_file = model_file
        self.det_size = (det_size, det_size)
        self.model = model_zoo.get_model(str(model_file), providers=["CPUExecutionProvider"])
        if not hasattr(self.model, "detect"):
            raise InputError(
                f"{model_file}: not a face detector model (insightface loaded {type(self.model).__name__})"
            )
        self.model.prepare(ctx_id=-1, input_size=self.det_size, det_thresh=det_thresh)

    @staticmethod
    def find_model_file(model_dir: str | os.PathLike) -> Path:
        """The detector .onnx inside `model_dir`; raise InputError saying where the pack goes."""
        model_dir = Path(model_dir)
        where = (
            f"unpack insightface's antelopev2 model pack there (by default {DEFAULT_DETECTOR_DIR}/ "
            "containing scrfd_10g_bnkps.onnx), or pass --keypoints with a keypoint file instead"
        )
        if not model_dir.is_dir():
            raise InputError(f"{model_dir}: detector model folder not found; {where}")
        preferred = model_dir / "scrfd_10g_bnkps.onnx"
        if preferred.is_file():
            return preferred
        candidates = sorted(model_dir.glob("det_*.onnx")) + sorted(model_dir.glob("scrfd*.onnx"))
        if not candidates:
            raise InputError(
                f"{model_dir}: no scrfd_10g_bnkps.onnx or det_*.onnx detector in this folder; {where}"
            )
        return candidates[0]

    def detect(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect faces in a BGR photo: boxes (N, 4), scores (N,), keypoints (N, 5, 2)."""
        _check_image(image_bgr)
        detections, kps = self.model.detect(image_bgr, input_size=self.det_size)  # (N, 5), (N, 5, 2)
        if kps is None:
            raise InputError(
                f"{self.model_file}: this detector gives no keypoints; use an SCRFD '*_kps' model"
            )
        detections = np.asarray(detections, dtype=np.float64).reshape(-1, 5)
        return detections[:, :4], detections[:, 4], np.asarray(kps, dtype=np.float64).reshape(-1, 5, 2)


# --------------------------------------------------------------------------- keypoint files


@dataclass
class KeypointEntry:
    """Keypoints (5, 2) of one image and, when given, its face box (4,)."""

    kps5: np.ndarray
    box: np.ndarray | None


def _entry(path: Path, where: str, kps: object, box: object) -> KeypointEntry:
    """Validate one keypoint record; errors name the file and `where` (line or entry)."""
    try:
        kps5 = _check_points(np.asarray(kps, dtype=np.float64), "keypoints", 5)
        checked_box = None if box is None else _check_box(np.asarray(box, dtype=np.float64))
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}, {where}: {err}") from err
    return KeypointEntry(kps5, checked_box)


def _load_keypoints_json(path: Path, text: str) -> dict[str, KeypointEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise InputError(f'{path}: expected a JSON object mapping image names to {{"kps": ..., "box": ...}}')
    table = {}
    for name, record in data.items():
        if not isinstance(record, dict) or "kps" not in record:
            raise InputError(
                f'{path}, entry {name!r}: expected an object with key "kps" (and optionally "box")'
            )
        unknown = set(record) - {"kps", "box"}
        if unknown:
            raise InputError(f"{path}, entry {name!r}: unknown keys {sorted(unknown)} (allowed: kps, box)")
        table[name] = _entry(path, f"entry {name!r}", record["kps"], record.get("box"))
    return table


def _load_keypoints_txt(path: Path, text: str) -> dict[str, KeypointEntry]:
    table: dict[str, KeypointEntry] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        name, values = tokens[0], tokens[1:]
        if len(values) not in (10, 14):
            raise InputError(
                f"{path}, line {number}: expected 'name x1 y1 ... x5 y5 [bx1 by1 bx2 by2]' "
                f"(10 or 14 numbers after the name), found {len(values)}"
            )
        try:
            numbers = [float(v) for v in values]
        except ValueError as err:
            raise InputError(f"{path}, line {number}: {err}") from err
        if name in table:
            raise InputError(f"{path}, line {number}: {name!r} already given on line {first_line[name]}")
        first_line[name] = number
        box = numbers[10:] or None
        table[name] = _entry(path, f"line {number}", np.reshape(numbers[:10], (5, 2)), box)
    return table


def load_keypoints(path: str | os.PathLike) -> dict[str, KeypointEntry]:
    """Read a keypoint file: image name (relative path or stem) -> KeypointEntry.

    Formats (chosen by extension):
      - `.json`: {"name": {"kps": [[x, y] × 5], "box": [x1, y1, x2, y2]}, ...}, box optional;
      - anything else, text: one image per line `name x1 y1 ... x5 y5 [bx1 by1 bx2 by2]`,
        blank lines and `#` comments ignored (names cannot contain spaces).
    Keypoint order: left eye, right eye, nose tip, left mouth corner, right mouth corner.
    Errors name the file and the line (or JSON entry).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: keypoint file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file ({err})") from err
    loader = _load_keypoints_json if path.suffix.lower() == ".json" else _load_keypoints_txt
    table = loader(path, text)
    if not table:
        raise InputError(f"{path}: no keypoint entries")
    return table


def lookup_keypoints(table: dict[str, KeypointEntry], relative_path: str) -> KeypointEntry | None:
    """Find an image's entry by relative path, path without suffix, file name or stem."""
    rel = Path(relative_path)
    for key in (rel.as_posix(), rel.with_suffix("").as_posix(), rel.name, rel.stem):
        if key in table:
            return table[key]
    return None


# --------------------------------------------------------------------------- command line


def list_images(input_path: Path) -> list[tuple[Path, str]]:
    """(image path, path relative to the input as given) for a folder, one image or a list file.

    A folder is scanned (not recursively) for image suffixes; a text list file names one image
    per line, relative to the list file's folder unless absolute.
    """
    if input_path.is_dir():
        return [
            (p, p.name)
            for p in sorted(input_path.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not input_path.is_file():
        raise InputError(f"{input_path}: input folder or list file not found")
    if input_path.suffix.lower() in IMAGE_SUFFIXES:
        return [(input_path, input_path.name)]
    images = []
    for line in input_path.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry)
            images.append((path if path.is_absolute() else input_path.parent / path, entry))
    return images


def _face_from_detector(
    detector: InsightFaceDetector, image: np.ndarray, min_score: float
) -> tuple[np.ndarray, np.ndarray]:
    boxes, scores, kps = detector.detect(image)
    index = pick_face(boxes, scores, kps, image.shape, min_score)
    if index is None:
        raise InputError(f"no face found (detections: {len(scores)}, min score {min_score})")
    return kps[index], boxes[index]


def _process_image(
    image_path: Path,
    relative: str,
    out_dir: Path,
    keypoints: dict[str, KeypointEntry] | None,
    detector: InsightFaceDetector | None,
    min_score: float,
) -> dict:
    """Crop one photo, write `<name>.jpg` and `<name>.npy`; return its report entry."""
    if keypoints is not None:
        entry = lookup_keypoints(keypoints, relative)
        if entry is None:
            raise InputError(f"no keypoints for {relative!r} in the keypoint file")
        image = read_image(image_path)
        kps5, box = entry.kps5, entry.box
    else:
        image = read_image(image_path)
        kps5, box = _face_from_detector(detector, image, min_score)
    face = prepare_face(image, kps5, box)
    name = Path(relative).stem
    write_image(out_dir / f"{name}.jpg", face.crop224)
    save_npy(out_dir / f"{name}.npy", face.arcface)
    return {
        "image": str(image_path),
        "name": name,
        "box": face.box.round(2).tolist(),
        "kps5": face.kps5.round(2).tolist(),
        "box_estimated": box is None,
    }


def run(
    input_path: Path,
    out_dir: Path,
    keypoints: dict[str, KeypointEntry] | None = None,
    detector: InsightFaceDetector | None = None,
    min_score: float = 0.0,
) -> dict:
    """Preprocess every image; return the report (also written to the output folder).

    Exactly one of `keypoints` (from `load_keypoints`) and `detector` must be given. A face
    that cannot be found, an unreadable image or missing keypoints is recorded as a failure
    and the run goes on. Output names are file stems and must be unique.
    """
    if (keypoints is None) == (detector is None):
        raise ValueError("give exactly one of keypoints and detector")
    if input_path.is_dir() and input_path.resolve() == out_dir.resolve():
        raise InputError(f"{out_dir}: the output folder must differ from the input folder")
    images = list_images(input_path)
    if not images:
        raise InputError(f"{input_path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    processed, failed, used_names = [], [], {}
    with logging_redirect_tqdm():
        for image_path, relative in progress(images, desc="preprocess", unit="image"):
            name = Path(relative).stem
            try:
                if name in used_names:
                    raise InputError(f"output name {name!r} already used by {used_names[name]}")
                processed.append(
                    _process_image(image_path, relative, out_dir, keypoints, detector, min_score)
                )
                used_names[name] = str(image_path)
            except (InputError, ValueError) as err:
                logger.warning("skipped %s: %s", image_path, err)
                failed.append({"image": str(image_path), "reason": str(err)})
    report = {"input": str(input_path), "processed": processed, "failed": failed}
    with atomic_write(out_dir / "preprocess_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with atomic_write(out_dir / "list.txt") as tmp:
        tmp.write_text("".join(f"{item['name']}\n" for item in processed), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 when at least one image was processed."""
    parser = argparse.ArgumentParser(
        prog="python -m ofer.preprocess",
        description="Crop faces from photos: <out>/<name>.jpg (224 FaRL crop) and "
        "<out>/<name>.npy (ArcFace input).",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="folder of images, one image, or a text file listing images"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--keypoints", type=Path, help="JSON or text file with 5 keypoints (and optional box) per image"
    )
    source.add_argument(
        "--detector-dir",
        type=Path,
        default=DEFAULT_DETECTOR_DIR,
        help=f"insightface antelopev2 folder (default {DEFAULT_DETECTOR_DIR})",
    )
    parser.add_argument("--min-score", type=float, default=0.5, help="detector score threshold (default 0.5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.keypoints is not None:
            report = run(args.input, args.out, keypoints=load_keypoints(args.keypoints))
        else:
            detector = InsightFaceDetector(args.detector_dir, det_thresh=args.min_score)
            report = run(args.input, args.out, detector=detector, min_score=args.min_score)
    except (InputError, ImportError) as err:
        logger.error("%s", err)
        return 2
    n_ok, n_failed = len(report["processed"]), len(report["failed"])
    print(f"processed {n_ok} image(s), failed {n_failed}; report: {args.out / 'preprocess_report.json'}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
