"""The pictures test.py writes per image: the best shape over the input, the samples, the spread
maps and the IdRank scores.

All are drawn by `ofer.render` and OpenCV on the CPU; bench/pictures_speed.py times the first
two, bench/report_speed.py the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # only for annotations: the pipeline imports the uncertainty module, which imports this one
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


FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, RED = (0, 0, 0), (150, 150, 150), (40, 40, 220)  # BGR


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4,
          colour: tuple[int, int, int] = BLACK) -> None:
    cv2.putText(image, text, origin, FONT, scale, colour, 1, cv2.LINE_AA)


def spread_picture(vertices_mm: np.ndarray, faces: np.ndarray, spread_mm: np.ndarray, title: str,
                   colormap: Callable[[np.ndarray], np.ndarray], scale_mm: float, size: int = 200) -> np.ndarray:
    """Front view of a mesh coloured by a per-vertex spread (V,), with a colour bar in mm, on white.

    `colormap` maps spreads (K,) in mm to sRGB uint8 colours (K, 3) on the scale [0, scale_mm];
    the view is lit mostly by ambient light, so that the colours stay close to the bar's.
    """
    albedo = colormap(spread_mm)[:, ::-1] / 255.0  # (V, 3) BGR in [0, 1]
    white = np.full((size, size, 3), 255, dtype=np.uint8)
    view = frontal_view(vertices_mm, faces, size, background=white, albedo=albedo, ambient=0.6)
    title_h, bar_w, label_w, pad = 20, 14, 52, 8
    picture = np.full((title_h + size + 18, size + pad + bar_w + label_w, 3), 255, dtype=np.uint8)
    picture[title_h : title_h + size, :size] = view
    _text(picture, title, (4, 14))
    finite = spread_mm[np.isfinite(spread_mm)]
    if finite.size:
        _text(picture, f"mean {finite.mean():.2f} mm, max {finite.max():.2f} mm", (4, title_h + size + 13), 0.35)
    # The bar: the scale's top at the top, one row per value.
    top, bottom, left = title_h + 10, title_h + size - 10, size + pad
    values = np.linspace(scale_mm, 0.0, bottom - top)  # (rows,)
    picture[top:bottom, left : left + bar_w] = colormap(values)[:, None, ::-1]
    cv2.rectangle(picture, (left, top), (left + bar_w - 1, bottom - 1), GREY, 1)
    for tick in np.linspace(0.0, scale_mm, 5):
        y = round(bottom - 1 - tick / scale_mm * (bottom - top - 1))
        cv2.line(picture, (left + bar_w, y), (left + bar_w + 3, y), BLACK, 1)
        _text(picture, f"{tick:g}", (left + bar_w + 6, y + 4), 0.35)
    _text(picture, "mm", (left, top - 3), 0.35)
    return picture


def scores_plot(scores: np.ndarray, best: int, width: int = 320, height: int = 160) -> np.ndarray:
    """The N IdRank scores sorted from best to worst, the picked sample drawn in red, on white."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")  # (N,) sample indices, best first
    picture = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 48, width - 10, 22, height - 30
    _text(picture, f"IdRank scores of the {len(scores)} shapes, sorted", (4, 14))
    cv2.rectangle(picture, (left, top), (right, bottom), GREY, 1)
    low, high = scores.min(), scores.max()
    span = high - low if high > low else 1.0
    x = left + (np.arange(len(scores)) + 0.5) / len(scores) * (right - left)  # (N,)
    y = bottom - (scores[order] - low) / span * (bottom - top - 8) - 4  # (N,)
    points = np.round(np.stack([x, y], axis=1) * 16).astype(np.int32)  # 4 fractional bits
    cv2.polylines(picture, [points], False, GREY, 1, cv2.LINE_AA, shift=4)
    for i, (px, py) in enumerate(points):
        picked = order[i] == best
        cv2.circle(picture, (int(px), int(py)), 48 if picked else 24, RED if picked else BLACK, -1, cv2.LINE_AA,
                   shift=4)
    _text(picture, f"{high:.3g}", (4, top + 8), 0.35)
    _text(picture, f"{low:.3g}", (4, bottom), 0.35)
    _text(picture, "best", (left, bottom + 11), 0.33, GREY)
    _text(picture, "worst", (right - 28, bottom + 11), 0.33, GREY)
    _text(picture, f"pick: sample {best}, score {scores[best]:.3g}", (left, height - 8), 0.38, RED)
    return picture
