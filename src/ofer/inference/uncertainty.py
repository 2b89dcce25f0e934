"""Per-vertex uncertainty of OFER's samples: where the N identities, or the M expressions, disagree.

The spread of S meshes (S, V, 3) at vertex v is sqrt(mean_s ‖x_s,v − x̄_v‖²) in mm, x̄_v the
mean position of the vertex over the samples: the population standard deviation of the
vertex's 3-D position (the root of the trace of its 3×3 covariance), the quantity
`ofer.eval.metrics.diversity` averages into the benchmark's diversity columns.

- shape spread: over the N neutral IdGen samples (all of them, before IdRank picks one);
- expression spread: over the M expressive meshes on the picked identity (identity fixed,
  so only expression and jaw count).

Maps use viridis (perceptual, readable in grey and by colour-blind readers) on one fixed scale,
0 to SPREAD_SCALE_MM, for every image and both maps, so that colours compare across images
and runs; larger spreads get the top colour. `write_uncertainty` writes one image's files into
its output folder (names in `ofer.inference.layout.UNCERTAINTY_FILES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ofer.inference.pictures import scores_plot, spread_picture
from ofer.io import save_npz, write_image, write_ply

if TYPE_CHECKING:
    from ofer.inference.pipeline import Reconstruction


SPREAD_SCALE_MM = 8.0  # top of the colour scale (mm): the demo's 99th percentiles are 7.8 (shape), 7.1 (expression)
# matplotlib's viridis (CC0), every 16th of its 256 entries and the last: sRGB, 0-255.
VIRIDIS = np.array([
    [68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141],
    [44, 114, 142], [38, 130, 142], [33, 145, 140], [31, 159, 136], [39, 173, 129], [61, 188, 116],
    [92, 200, 99], [129, 211, 77], [170, 220, 50], [213, 226, 26], [253, 231, 37],
], dtype=np.float64)


def vertex_spread(meshes: torch.Tensor) -> torch.Tensor:
    """Per-vertex spread (..., V) of meshes (..., S, V, 3): sqrt(mean_s ‖x_s − x̄‖²), in their unit."""
    centred = meshes - meshes.mean(dim=-3, keepdim=True)  # (..., S, V, 3)
    return centred.square().sum(-1).mean(-2).sqrt()


def spread_colors(spread_mm: np.ndarray, scale_mm: float = SPREAD_SCALE_MM) -> np.ndarray:
    """sRGB colours (V, 3) uint8 of spreads (V,) on the fixed viridis scale [0, scale_mm]."""
    position = np.clip(np.nan_to_num(np.asarray(spread_mm, dtype=np.float64)) / scale_mm, 0.0, 1.0)
    position *= len(VIRIDIS) - 1  # (V,) in table steps
    low = np.minimum(position.astype(np.int64), len(VIRIDIS) - 2)
    weight = (position - low)[:, None]
    return np.round((1 - weight) * VIRIDIS[low] + weight * VIRIDIS[low + 1]).astype(np.uint8)


def write_uncertainty(folder: Path, rec: Reconstruction, faces: np.ndarray) -> None:
    """Write one image's spread files into `folder` (its `<out>/<name>/`, or a folder moved there later).

    uncertainty.npz (`shape_spread_mm`, `expression_spread_mm` (V,) float32, `scale_mm`), the
    ranked neutral shape coloured by each spread (shape_spread.ply, expression_spread.ply:
    binary PLY with per-vertex RGB), their front views with a colour bar, and the plot of the
    IdRank scores. The pictures are drawn first, so a failure there writes nothing.
    """
    folder = Path(folder)
    maps = {"shape": (rec.shape_spread_mm, f"shape spread, N = {len(rec.shapes)}"),
            "expression": (rec.expression_spread_mm, f"expression spread, M = {len(rec.expressions)}")}
    pictures = {f"{key}_spread.png": spread_picture(rec.neutral_mm, faces, spread, title, spread_colors, SPREAD_SCALE_MM)
                for key, (spread, title) in maps.items()}
    pictures["scores.png"] = scores_plot(rec.scores, rec.best)
    save_npz(folder / "uncertainty.npz", shape_spread_mm=rec.shape_spread_mm.astype(np.float32),
             expression_spread_mm=rec.expression_spread_mm.astype(np.float32), scale_mm=np.float32(SPREAD_SCALE_MM))
    for key, (spread, _) in maps.items():
        write_ply(folder / f"{key}_spread.ply", rec.neutral_mm, faces, colors=spread_colors(spread))
    for file, picture in pictures.items():
        write_image(folder / file, picture)
