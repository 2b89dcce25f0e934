"""Occlusion augmentation: occluders pasted over the face in both training crops (ours, SPEC §8).

The paper is about occluded faces, but the released code trains on unoccluded crops. This
module pastes one random occluder — a rectangle, an ellipse, a hand (palm and fingers in a
skin colour) or a textured patch (noise, stripes, checker, or a piece of the same image) —
over the central face region of the 224 FaRL crop, and the same occluder, mapped through
the crop-to-ArcFace transform, over the 112 ArcFace input, so both encoders see one
consistent occlusion.

Conventions:
- image224: (224, 224, 3) uint8 BGR, as OpenCV reads the `.jpg` crops.
- arcface112: (3, 112, 112) float32 RGB, (x - 127.5) / 127.5, channels first (the `.npy`).
- arcface_matrix: (2, 3) affine map from 224-crop pixel coordinates to 112-crop pixel
  coordinates (OpenCV pixel centres at integers), as cv2.warpAffine takes it. None means the
  two crops cover the same region (the 112 input is the 224 crop resized).
- Pixels outside the occluder's mask are left bit-identical in both outputs.

Run `python -m ofer.data.occlusion --out preview.png` to look at a sheet of samples, and
`python -m ofer.data.occlusion --cfg my.yml --out preview.png` to see a config's settings.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from ofer.config import ConfigError, OcclusionConfig, load_config
from ofer.encoders.normalise import ARCFACE_SIZE, FARL_SIZE
from ofer.io import read_image, write_image
from ofer.preprocess import arcface_input, arcface_matrix_224_to_112, arcface_to_bgr, prepare_face
from ofer.render import image_grid

KINDS = ("rectangle", "ellipse", "hand", "texture")
# Occluder centres are drawn from this central part of the 224 crop, where the face is
# (the crop's side is 1.6 times the face box, SPEC §9).
_FACE_REGION = (0.3 * FARL_SIZE, 0.7 * FARL_SIZE)
# The 112 input when arcface_matrix is None: the 224 crop downscaled by 2, pixel centres kept.
_HALF_SCALE = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])
# Skin tones (BGR) the hands are drawn in, from light to dark.
_SKIN_TONES = np.array(
    [[196, 224, 255], [160, 192, 234], [120, 160, 214], [100, 134, 198], [54, 85, 141], [37, 56, 90]]
)
# Shapes are drawn at this canvas size, then resized to the wanted area.
_CANVAS = 512


# ---------------------------------------------------------------------------------------
# Occluder shapes: a bool mask cropped to its bounding box, drawn large on a blank canvas.


def _crop_to_content(canvas: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(canvas.any(1)), np.flatnonzero(canvas.any(0))
    return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] > 0


def _rectangle_shape(rng: np.random.Generator) -> np.ndarray:
    aspect = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
    size = (160 * np.sqrt(aspect), 160 / np.sqrt(aspect))
    corners = cv2.boxPoints(((_CANVAS / 2, _CANVAS / 2), size, rng.uniform(-45, 45)))
    canvas = np.zeros((_CANVAS, _CANVAS), np.uint8)
    cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 255)
    return _crop_to_content(canvas)


def _ellipse_shape(rng: np.random.Generator) -> np.ndarray:
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    axes = (round(90 * np.sqrt(aspect)), round(90 / np.sqrt(aspect)))
    canvas = np.zeros((_CANVAS, _CANVAS), np.uint8)
    cv2.ellipse(canvas, (_CANVAS // 2, _CANVAS // 2), axes, rng.uniform(0, 180), 0, 360, 255, -1)
    return _crop_to_content(canvas)


def _hand_shape(rng: np.random.Generator) -> np.ndarray:
    """A palm ellipse with four finger capsules fanned out above it and usually a thumb."""
    palm_w, palm_h = rng.uniform(50, 60), rng.uniform(58, 72)  # semi-axes, hand frame (y up)
    length, thickness = rng.uniform(95, 125), int(rng.integers(24, 31))
    spread = np.deg2rad(rng.uniform(0, 40))
    capsules = []  # (base (2,), direction angle from +y, length, thickness)
    for i, relative_length in enumerate((0.8, 1.0, 0.95, 0.75)):
        base = np.array([palm_w * (-0.7 + 1.4 * i / 3), 0.6 * palm_h])
        angle = spread * (i / 3 - 0.5) + np.deg2rad(rng.uniform(-5, 5))
        capsules.append((base, angle, length * relative_length * rng.uniform(0.9, 1.1), thickness))
    if rng.random() < 0.75:
        side = rng.choice([-1.0, 1.0])
        base = np.array([side * 0.8 * palm_w, -0.1 * palm_h])
        capsules.append((base, side * np.deg2rad(rng.uniform(45, 80)), 0.65 * length, int(thickness * 1.15)))

    # Hand frame (x right, y up) -> canvas pixels (y down), rotated as a whole.
    turn = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])

    def to_canvas(point: np.ndarray) -> tuple[int, int]:
        x, y = rotation @ point
        return round(_CANVAS / 2 + x), round(_CANVAS / 2 - y)

    canvas = np.zeros((_CANVAS, _CANVAS), np.uint8)
    cv2.ellipse(canvas, to_canvas(np.zeros(2)), (int(palm_w), int(palm_h)), -np.rad2deg(turn), 0, 360, 255, -1)
    for base, angle, finger_length, finger_thickness in capsules:
        tip = base + finger_length * np.array([np.sin(angle), np.cos(angle)])
        cv2.line(canvas, to_canvas(base), to_canvas(tip), 255, finger_thickness)
    return _crop_to_content(canvas)


def _texture_shape(rng: np.random.Generator) -> np.ndarray:
    return _rectangle_shape(rng) if rng.random() < 0.5 else _ellipse_shape(rng)


_SHAPES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "rectangle": _rectangle_shape,
    "ellipse": _ellipse_shape,
    "hand": _hand_shape,
    "texture": _texture_shape,
}


def _resize_to_area(shape: np.ndarray, area: float) -> np.ndarray:
    """Scale a bool mask so that it covers about `area` pixels and fits in the 224 crop."""
    height, width = shape.shape
    scale = min(np.sqrt(area / shape.sum()), FARL_SIZE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(shape.astype(np.float32), size, interpolation=interpolation) >= 0.5


# ---------------------------------------------------------------------------------------
# Occluder appearance: a (h, w, 3) uint8 BGR layer for a stamp of that size.


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _plain_layer(shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour with a linear gradient in a random direction and some grain."""
    height, width = shape.shape
    rows, cols = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * cols + np.sin(angle) * rows) / max(height, width)  # (h, w), |ramp| <= ~1.4
    layer = _random_colour(rng) + rng.uniform(-40, 40) * ramp[..., None]
    layer += rng.normal(0, rng.uniform(0, 12), size=(height, width, 3))
    return np.clip(np.round(layer), 0, 255).astype(np.uint8)


def _skin_layer(shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A skin tone, darker towards the outline so fingers and palm look rounded."""
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.uniform(-15, 15, size=3)
    inset = cv2.distanceTransform(np.pad(shape, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    radius = max(0.06 * np.sqrt(shape.sum()), 1.0)  # about a finger's half-width
    light = 0.6 + 0.4 * np.sqrt(np.clip(inset / radius, 0, 1))  # (h, w)
    layer = tone * light[..., None] + rng.normal(0, 3, size=(*shape.shape, 3))
    return np.clip(np.round(layer), 0, 255).astype(np.uint8)


def _pattern_layer(shape: np.ndarray, image224: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour noise, stripes, a checkerboard, or a piece of another part of the image."""
    height, width = shape.shape
    pattern = rng.choice(["noise", "stripes", "checker", "patch"])
    if pattern == "patch":
        top, left = rng.integers(0, FARL_SIZE - height + 1), rng.integers(0, FARL_SIZE - width + 1)
        return image224[top : top + height, left : left + width].copy()
    if pattern == "noise":
        cell = int(rng.integers(2, 17))
        coarse = rng.uniform(0, 255, size=(-(-height // cell), -(-width // cell), 3)).astype(np.float32)
        return np.round(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)).astype(np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * cols + np.sin(angle) * rows
    across = -np.sin(angle) * cols + np.cos(angle) * rows
    period = rng.uniform(6, 30)
    if pattern == "stripes":
        first = (along // (period / 2)) % 2 == 0
    else:
        first = ((along // period) + (across // period)) % 2 == 0
    colours = np.round([_random_colour(rng), _random_colour(rng)]).astype(np.uint8)
    return np.where(first[..., None], colours[0], colours[1])


# ---------------------------------------------------------------------------------------


def paste_occluder(
    image224: np.ndarray,
    arcface112: np.ndarray,
    arcface_matrix: np.ndarray | None,
    mask224: np.ndarray,
    layer224: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste an occluder into both crops; the inputs are not modified.

    The mask and the occluder layer are warped into the 112 crop with `arcface_matrix`
    (bilinear; a 112 pixel is occluded when at least half of it is). The layer should hold
    the occluder's colours on and around the mask, since the warp samples both.

    Args:
        image224: (224, 224, 3) uint8 BGR crop.
        arcface112: (3, 112, 112) float32 normalised RGB ArcFace input.
        arcface_matrix: (2, 3) 224-crop -> 112-crop pixel map, or None for a plain resize.
        mask224: (224, 224) bool, the occluded pixels of the 224 crop.
        layer224: (224, 224, 3) uint8 BGR occluder appearance.

    Returns:
        image224 and arcface112 with the occluder pasted, and the (112, 112) bool mask of the
        ArcFace pixels that were replaced.
    """
    _check_inputs(image224, arcface112, arcface_matrix)
    if mask224.shape != (FARL_SIZE, FARL_SIZE) or mask224.dtype != bool:
        raise ValueError(f"mask224 must be a (224, 224) bool array, got {mask224.dtype} {mask224.shape}")
    if layer224.shape != image224.shape or layer224.dtype != np.uint8:
        raise ValueError(f"layer224 must be a (224, 224, 3) uint8 image, got {layer224.dtype} {layer224.shape}")
    matrix = _HALF_SCALE if arcface_matrix is None else np.asarray(arcface_matrix, dtype=np.float64)
    size = (ARCFACE_SIZE, ARCFACE_SIZE)
    coverage = cv2.warpAffine(mask224.astype(np.float32), matrix, size, flags=cv2.INTER_LINEAR, borderValue=0)
    mask112 = coverage >= 0.5  # (112, 112)
    layer112 = cv2.warpAffine(layer224, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    out224 = image224.copy()
    out224[mask224] = layer224[mask224]
    out112 = arcface112.copy()
    out112[:, mask112] = arcface_input(layer112)[:, mask112]
    return out224, out112, mask112


def _check_inputs(image224: np.ndarray, arcface112: np.ndarray, arcface_matrix: np.ndarray | None) -> None:
    if (
        not isinstance(image224, np.ndarray)
        or image224.shape != (FARL_SIZE, FARL_SIZE, 3)
        or image224.dtype != np.uint8
    ):
        raise ValueError(
            f"image224 must be a (224, 224, 3) uint8 BGR image, got {getattr(image224, 'shape', image224)}"
        )
    if (
        not isinstance(arcface112, np.ndarray)
        or arcface112.shape != (3, ARCFACE_SIZE, ARCFACE_SIZE)
        or arcface112.dtype != np.float32
    ):
        raise ValueError(
            f"arcface112 must be a (3, 112, 112) float32 array, got {getattr(arcface112, 'shape', arcface112)}"
        )
    if arcface_matrix is not None:
        matrix = np.asarray(arcface_matrix)
        if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
            raise ValueError(f"arcface_matrix must be a finite (2, 3) affine matrix, got shape {matrix.shape}")


class OcclusionAugment:
    """Random occluder over the face, applied consistently to the 224 crop and the 112 input.

    Args:
        prob: chance that an item gets an occluder at all.
        min_area, max_area: occluded share of the 224 crop, drawn uniformly in this range.
        kinds: occluder kinds to draw from (uniformly), a subset of KINDS.
    """

    def __init__(
        self,
        prob: float = 0.5,
        min_area: float = 0.05,
        max_area: float = 0.35,
        kinds: Sequence[str] = KINDS,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        if not 0.0 < min_area <= max_area <= 0.5:
            raise ValueError(f"need 0 < min_area <= max_area <= 0.5, got {min_area} and {max_area}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
        self.prob, self.min_area, self.max_area, self.kinds = prob, min_area, max_area, tuple(kinds)

    @classmethod
    def from_config(cls, occlusion: OcclusionConfig) -> OcclusionAugment:
        """The augmenter a config's `dataset.occlusion` section describes (what training applies)."""
        return cls(prob=occlusion.prob, min_area=occlusion.min_area, max_area=occlusion.max_area,
                   kinds=occlusion.kinds)

    def __call__(
        self,
        image224: np.ndarray,
        arcface112: np.ndarray,
        arcface_matrix: np.ndarray | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Occlude one item (see the module conventions); the inputs are not modified.

        Returns:
            image224 (224, 224, 3) uint8, arcface112 (3, 112, 112) float32 and mask224
            (224, 224) bool, the occluded pixels of the 224 crop (all False if none).
        """
        _check_inputs(image224, arcface112, arcface_matrix)
        if rng.random() >= self.prob:
            return image224.copy(), arcface112.copy(), np.zeros((FARL_SIZE, FARL_SIZE), dtype=bool)
        kind = self.kinds[rng.integers(len(self.kinds))]
        area = rng.uniform(self.min_area, self.max_area) * FARL_SIZE**2
        shape = _resize_to_area(_SHAPES[kind](rng), area)  # (h, w) bool stamp
        if kind == "hand":
            stamp_layer = _skin_layer(shape, rng)
        elif kind == "texture":
            stamp_layer = _pattern_layer(shape, image224, rng)
        else:
            stamp_layer = _plain_layer(shape, rng)

        height, width = shape.shape
        top, left = _place(height, rng), _place(width, rng)
        mask224 = np.zeros((FARL_SIZE, FARL_SIZE), dtype=bool)
        mask224[top : top + height, left : left + width] = shape
        # The stamp's edge colours continue outward so the 112 warp samples no black fringe.
        layer224 = cv2.copyMakeBorder(
            stamp_layer, top, FARL_SIZE - top - height, left, FARL_SIZE - left - width, cv2.BORDER_REPLICATE
        )
        out224, out112, _ = paste_occluder(image224, arcface112, arcface_matrix, mask224, layer224)
        return out224, out112, mask224


def _place(extent: int, rng: np.random.Generator) -> int:
    """Start of a stamp of `extent` pixels whose centre falls in the face region if it can."""
    low, high = max(_FACE_REGION[0], extent / 2), min(_FACE_REGION[1], FARL_SIZE - extent / 2)
    centre = rng.uniform(low, high) if low < high else FARL_SIZE / 2
    return int(np.clip(round(centre - extent / 2), 0, FARL_SIZE - extent))


# ---------------------------------------------------------------------------------------
# Preview: a sheet of augmented samples for a person to look at.


def preview(
    images: Sequence[np.ndarray],
    out_path: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    arcface_matrices: Sequence[np.ndarray | None] | None = None,
    augment: OcclusionAugment | None = None,
) -> np.ndarray:
    """Write a sheet of n augmented samples in up to 4 columns; each shows the 224 crop and the 112 input.

    Sample i uses images[i % len(images)]. Without `augment` every sample is occluded, with the
    kind KINDS[i % 4], so every kind appears; with `augment` (e.g. a config's, `from_config`) the
    samples are drawn as training draws them, unoccluded ones included.
    The 112 input is made from the crop with the image's arcface matrix (or a resize).

    Args:
        images: (224, 224, 3) uint8 BGR crops.
        out_path: where to write the sheet (.png/.jpg).
        arcface_matrices: one (2, 3) matrix or None per image; None for all resized.
        augment: the augmenter to draw every sample with (None: each kind in turn, always occluded).

    Returns:
        The sheet written, (H, W, 3) uint8 BGR.
    """
    if not images:
        raise ValueError("preview needs at least one image")
    matrices = arcface_matrices if arcface_matrices is not None else [None] * len(images)
    if len(matrices) != len(images):
        raise ValueError(f"got {len(matrices)} arcface matrices for {len(images)} images")
    rng = np.random.default_rng(seed)
    crops, inputs, labels = [], [], []
    for i in range(n):
        image, matrix = images[i % len(images)], matrices[i % len(images)]
        size = (ARCFACE_SIZE, ARCFACE_SIZE)
        crop112 = (
            cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            if matrix is None
            else cv2.warpAffine(image, matrix, size)
        )
        kind = KINDS[i % len(KINDS)]
        drawn = OcclusionAugment(prob=1.0, kinds=(kind,)) if augment is None else augment
        out224, out112, mask = drawn(image, arcface_input(crop112), matrix, rng)
        crops.append(out224)
        inputs.append(out112)
        what = kind if augment is None else ("occluded" if mask.any() else "not occluded")
        labels.append(f"{what}  {100 * mask.mean():.0f}% of the crop")
    sheet = input_sheet(crops, inputs, labels)
    write_image(out_path, sheet)
    return sheet


def input_sheet(crops224: Sequence[np.ndarray], arcface112: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """A sheet of encoder inputs in up to 4 columns: per cell the 224 crop and, enlarged beside it, the 112 input.

    Shared by `preview` and the trainer's picture of its first training batch.

    Args:
        crops224: (224, 224, 3) uint8 BGR crops.
        arcface112: (3, 112, 112) float32 ArcFace inputs, one per crop.
        labels: one line per cell, shown above the 224 crop.

    Returns:
        (H, W, 3) uint8 BGR.
    """
    if len(arcface112) != len(crops224) or len(labels) != len(crops224):
        raise ValueError(f"got {len(crops224)} crops, {len(arcface112)} ArcFace inputs and {len(labels)} labels")
    cells = []
    for crop, arcface in zip(crops224, arcface112):
        shown112 = cv2.resize(arcface_to_bgr(arcface), (FARL_SIZE, FARL_SIZE), interpolation=cv2.INTER_NEAREST)
        cells.append(np.concatenate([crop, shown112], axis=1))  # (224, 448, 3)
    return image_grid(cells, ncols=min(4, len(cells)), labels=[f"{label}  | 112 ArcFace input" for label in labels])


# The five ArcFace keypoints (image-left eye, image-right eye, nose tip, mouth corners) of
# scikit-image's 512x512 astronaut portrait, picked by hand.
_ASTRONAUT_KEYPOINTS = np.array([[203.0, 101.0], [246.0, 103.0], [222.5, 125.0], [202.5, 141.0], [244.5, 141.0]])


def _astronaut_sample() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's 224 face crop, made as for any photo, and its 224 -> 112 ArcFace matrix."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("the default preview image needs scikit-image; pass --images instead") from err
    photo = np.ascontiguousarray(data.astronaut()[..., ::-1])  # RGB -> BGR
    face = prepare_face(photo, _ASTRONAUT_KEYPOINTS)
    return face.crop224, arcface_matrix_224_to_112(face.m224, face.m112)


def _load_crops(paths: Sequence[str]) -> list[np.ndarray]:
    """Images from files and folders (searched recursively), centre-cropped to 224 squares."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(p for p in entry.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        else:
            files.append(entry)
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images found in {list(paths)}")
    crops = []
    for file in files:
        image = read_image(file)
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        square = image[top : top + side, left : left + side]
        crops.append(cv2.resize(square, (FARL_SIZE, FARL_SIZE), interpolation=cv2.INTER_AREA))
    return crops


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ofer.data.occlusion",
        description="Write a sheet of occlusion-augmented samples to look at. Images are "
        "centre-cropped to 224 squares (pass 224 face crops, e.g. a dataset's arcface_input "
        "folder); without --images, the face of scikit-image's astronaut photo is used.",
    )
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders")
    parser.add_argument("--out", default="occlusion_preview.png", help="output picture (.png/.jpg)")
    parser.add_argument("--n", type=int, default=16, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", help="a training config: draw the samples with its dataset.occlusion settings "
                                      "(prob, areas, kinds), as training does; default: every kind in turn")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as the training scripts take it (with --cfg)")
    args = parser.parse_args(argv)
    augment = None
    if args.cfg is not None:
        try:
            occlusion = load_config(args.cfg, args.opt).dataset.occlusion
        except ConfigError as err:
            parser.exit(2, f"error: {err}\n")
        if not occlusion.enabled:
            logging.getLogger(__name__).warning("%s: dataset.occlusion.enabled is false, so training does not "
                                                "occlude; showing what it would do with these settings", args.cfg)
        augment = OcclusionAugment.from_config(occlusion)
    elif args.opt:
        parser.error("--opt needs --cfg")
    if args.images:
        crops = _load_crops(args.images)
        matrices = None
    else:
        crop, matrix = _astronaut_sample()
        crops, matrices = [crop], [matrix]
    preview(crops, args.out, n=args.n, seed=args.seed, arcface_matrices=matrices, augment=augment)
    settings = "" if augment is None else (f", {args.cfg}: prob {augment.prob}, area {augment.min_area}-"
                                           f"{augment.max_area}, kinds {', '.join(augment.kinds)}")
    print(f"wrote {args.out} ({args.n} samples from {len(crops)} image(s), seed {args.seed}{settings})")


if __name__ == "__main__":
    main()
