"""Accuracy and diversity of sampled reconstructions against a same-topology ground truth.

OFER produces several plausible meshes per image. Following the idea of the paper's CO-545
protocol (whose evaluation code is not released), we measure, for S samples (S, V, 3) and a
ground-truth mesh (V, 3) in the same topology (mm):

- accuracy of the ranked pick (a given sample index), of the oracle best sample, and of the
  mean of the samples, each as the mean per-vertex Euclidean error over a region;
- diversity: the per-vertex spread of the samples, sqrt(mean_s ‖x_s,v − x̄_v‖²) (population
  std of the 3-D position), averaged over a region;

on the regions `all`, `visible` and `occluded` given a per-vertex occlusion mask. The oracle
is chosen per region: its error on a region is min over samples of that sample's region error
(best-of-S). Optionally each mesh is first rigidly aligned to the ground truth (rotation +
translation, Procrustes on a chosen vertex subset); diversity is always measured on the
samples as given, since a common rigid motion does not change it but per-sample alignment
would remove part of it.

Command: python -m ofer.eval.metrics --pred OUTDIR --gt GTDIR [--masks DIR] [--align]
reads the test.py output (SPEC §11) `<out>/flamesample/<name>_0_<k>.ply` (samples),
`<out>/shapesample/<name>_0.ply` (best neutral shape, reported as a baseline when present),
the ground truth `<gt>/<name>.ply` and optionally `<masks>/<name>_occlusion.npy` (boolean
(V,), True = occluded; `--masks` defaults to the ground-truth folder). The ranked pick is
the sample k = `--ranked-index` (default 0, the first saved sample). With `--align` the rigid
fit uses the visible vertices when a mask is given, all vertices otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ofer.eval import exit_code, write_json_report
from ofer.eval.geometry import similarity_procrustes
from ofer.inference.layout import expression_sample_files, in_list_order, output_name, read_marker
from ofer.io import InputError, list_entries, load_array, read_mesh

logger = logging.getLogger(__name__)

REGIONS = ("all", "visible", "occluded")


def vertex_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-vertex Euclidean distance: pred (..., V, 3), gt (V, 3) -> (..., V)."""
    return np.linalg.norm(np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64), axis=-1)


def rigid_align(pred: np.ndarray, gt: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
    """Rigidly move pred (V, 3) onto gt (V, 3), fitting rotation + translation on `indices` (all if None)."""
    subset = slice(None) if indices is None else indices
    return similarity_procrustes(pred[subset], gt[subset], with_scale=False).apply(pred)


def region_masks(num_vertices: int, occluded: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """Boolean vertex masks per region; visible/occluded are None without an occlusion mask."""
    everything = np.ones(num_vertices, dtype=bool)
    if occluded is None:
        return {"all": everything, "visible": None, "occluded": None}
    occluded = np.asarray(occluded)
    if occluded.shape != (num_vertices,) or occluded.dtype != bool:
        raise ValueError(f"occlusion mask must be boolean ({num_vertices},), got {occluded.dtype} {occluded.shape}")
    return {"all": everything, "visible": ~occluded, "occluded": occluded}


def _region_mean(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray | float:
    """Mean over the vertices (last axis) in mask; NaN for a missing or empty region."""
    if mask is None or not mask.any():
        return np.full(values.shape[:-1], math.nan) if values.ndim > 1 else math.nan
    return values[..., mask].mean(-1)


def diversity(samples: np.ndarray) -> np.ndarray:
    """Per-vertex spread (V,) of samples (S, V, 3): sqrt(mean_s ‖x_s − mean‖²)."""
    samples = np.asarray(samples, dtype=np.float64)
    return np.sqrt(((samples - samples.mean(0)) ** 2).sum(-1).mean(0))


def evaluate_samples(
    samples: np.ndarray,
    gt: np.ndarray,
    occluded: np.ndarray | None = None,
    ranked_index: int = 0,
    align: bool = False,
    align_indices: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy and diversity of samples (S, V, 3) against gt (V, 3), per region.

    Returns {"ranked" | "oracle" | "mean" | "diversity": {region: value in mm}} with regions
    `all`, `visible`, `occluded` (NaN where there is no mask or the region is empty).
    `align` rigidly aligns each sample and the sample mean to gt on `align_indices` first.
    """
    samples = np.asarray(samples, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[1:] != gt.shape or gt.shape[-1] != 3:
        raise ValueError(f"samples must be (S, V, 3) and gt (V, 3) with the same V, got {samples.shape} and {gt.shape}")
    if not -len(samples) <= ranked_index < len(samples):
        raise ValueError(f"ranked_index {ranked_index} out of range for {len(samples)} samples")
    masks = region_masks(gt.shape[0], occluded)
    mean_mesh = samples.mean(0)  # (V, 3)
    if align:
        aligned = np.stack([rigid_align(s, gt, align_indices) for s in samples])  # (S, V, 3)
        mean_mesh = rigid_align(mean_mesh, gt, align_indices)
    else:
        aligned = samples
    sample_errors = vertex_errors(aligned, gt)  # (S, V)
    mean_errors = vertex_errors(mean_mesh, gt)  # (V,)
    spread = diversity(samples)  # (V,)
    report: dict[str, dict[str, float]] = {"ranked": {}, "oracle": {}, "mean": {}, "diversity": {}}
    for region, mask in masks.items():
        per_sample = _region_mean(sample_errors, mask)  # (S,)
        report["ranked"][region] = float(per_sample[ranked_index])
        report["oracle"][region] = float(np.min(per_sample))
        report["mean"][region] = float(_region_mean(mean_errors, mask))
        report["diversity"][region] = float(_region_mean(spread, mask))
    return report


def mesh_errors(pred: np.ndarray, gt: np.ndarray, occluded: np.ndarray | None = None, align: bool = False,
                align_indices: np.ndarray | None = None) -> dict[str, float]:
    """Mean per-vertex error per region of a single mesh pred (V, 3) against gt (V, 3)."""
    return evaluate_samples(np.asarray(pred)[None], gt, occluded, 0, align, align_indices)["ranked"]


# ----------------------------------------------------------------------------- command line


def find_samples(out_dir: Path, name: str) -> list[Path]:
    """Expression sample meshes `<out>/flamesample/<name>_0_<k>.ply` (or `.obj`), ordered by k.

    When the image has a done marker (test.py's `<name>/done.json`) only the samples it lists
    are read: files an earlier run left beside them are not part of the reconstruction. A folder
    written without markers (the original code) is read as found on disk.
    """
    found = expression_sample_files(out_dir, name)  # by k, .ply before .obj
    marker = read_marker(out_dir, name)
    if marker is not None and isinstance(marker.get("files"), list):
        listed = set(marker["files"])
        found = [f for f in found if f in listed]
    first = {}  # one mesh per sample k: the .ply where both formats were written
    for f in found:
        first.setdefault(Path(f).stem, f)
    return [out_dir / f for f in first.values()]


def list_order(pred_dir: Path, names: list[str], list_file: str | os.PathLike | None = None) -> list[str]:
    """`names` in the order of the image list: `list_file` (test.py's --filename) when given, else
    the order recorded in `<pred>/summary.json` (`listed`); names not listed follow, sorted."""
    if list_file is not None:
        listed = [output_name(entry) for _, entry in list_entries(list_file)]
    else:
        try:
            listed = json.loads((pred_dir / "summary.json").read_text())["listed"]
        except (OSError, ValueError, KeyError, TypeError):
            listed = None
    return in_list_order(names, listed)


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, masks_dir: str | os.PathLike | None = None,
                    ranked_index: int = 0, align: bool = False, list_file: str | os.PathLike | None = None) -> dict:
    """Evaluate every `<gt>/<name>.ply` against the test.py outputs in pred_dir, in list order (`list_order`)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found (test.py's --outputpath)")
    masks_dir = Path(masks_dir) if masks_dir is not None else gt_dir
    names = list_order(pred_dir, [p.stem for p in gt_dir.glob("*.ply")], list_file)
    if not names:
        raise InputError(f"{gt_dir}: no ground-truth .ply meshes")
    per_image, missing = {}, []
    for name in names:
        sample_paths = find_samples(pred_dir, name)
        if not sample_paths:
            missing.append(name)
            logger.warning("no samples for %s in %s", name, pred_dir / "flamesample")
            continue
        gt, _ = read_mesh(gt_dir / f"{name}.ply")
        samples = np.stack([_read_vertices(p, gt.shape[0]) for p in sample_paths])  # (S, V, 3)
        mask_path = masks_dir / f"{name}_occlusion.npy"
        occluded = load_array(mask_path, (gt.shape[0],), boolean=True) if mask_path.is_file() else None
        fit_on = None if occluded is None else np.flatnonzero(~occluded)  # align on what the image shows
        result = evaluate_samples(samples, gt, occluded, ranked_index, align, fit_on)
        shape_path = pred_dir / "shapesample" / f"{name}_0.ply"
        if shape_path.is_file():
            result["neutral_shape"] = mesh_errors(_read_vertices(shape_path, gt.shape[0]), gt, occluded, align, fit_on)
        per_image[name] = {"num_samples": len(sample_paths), **result}
    keys = sorted({k for r in per_image.values() for k in r if k != "num_samples"})
    mean = {k: {region: nanmean([r[k][region] for r in per_image.values() if k in r]) for region in REGIONS}
            for k in keys}
    return {"unit": "mm", "ranked_index": ranked_index, "aligned": align, "n_images": len(names),
            "n_evaluated": len(per_image), "n_missing": len(missing), "missing": missing,
            "mean_over_images": mean, "per_image": per_image}


def _read_vertices(path: Path, num_vertices: int) -> np.ndarray:
    vertices, _ = read_mesh(path)
    if vertices.shape != (num_vertices, 3):
        raise InputError(f"{path}: expected {num_vertices} vertices (ground-truth topology), found {len(vertices)}")
    return vertices


def nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN when none is)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


COLUMN_NAMES = {"ranked": "rank", "oracle": "orac", "mean": "mean", "diversity": "dive", "neutral_shape": "neut"}


def legend(ranked_index: int = 0) -> str:
    """What the abbreviated column headers of `format_report` mean."""
    return "\n".join([
        "All values in mm: errors are mean per-vertex distances to the ground truth, diversity is a spread.",
        (f"  rank = expression sample k={ranked_index} on IdRank's identity (the single answer); "
         "orac = the best sample (oracle, best of S);"),
        "  mean = the average mesh of the samples; dive = diversity, per-vertex spread of the samples;",
        "  neut = IdRank's neutral shape (shapesample/) against the expressive truth: the baseline a sample beats",
        "         when it gets the expression right ('-': no shapesample);",
        "  /all, /vis, /occ = all vertices, the visible ones, the occluded ones (nan: no occluder or no mask).",
    ])


def format_report(report: dict) -> str:
    """Per-image rows and the mean over images, errors and diversity in mm, with a legend."""
    columns = [("ranked", "all"), ("ranked", "visible"), ("ranked", "occluded"), ("oracle", "all"),
               ("oracle", "occluded"), ("mean", "all"), ("diversity", "visible"), ("diversity", "occluded"),
               ("neutral_shape", "all")]
    header = f"{'image':<24}" + "".join(f"{f'{COLUMN_NAMES[k]}/{r[:3]}':>10}" for k, r in columns)

    def cell(row: dict, key: str, region: str) -> str:
        return f"{row[key][region]:>10.3f}" if key in row else f"{'-':>10}"

    rows = [f"{name[:24]:<24}" + "".join(cell(r, k, reg) for k, reg in columns)
            for name, r in report["per_image"].items()]
    mean = report["mean_over_images"]
    if mean:
        rows.append(f"{'MEAN':<24}" + "".join(cell(mean, k, reg) for k, reg in columns))
    return "\n".join([header, *rows, f"missing predictions: {report['n_missing']} of {report['n_images']}",
                      legend(report["ranked_index"])])


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Accuracy and diversity of OFER samples against ground-truth meshes.")
    parser.add_argument("--pred", required=True, help="test.py output folder (flamesample/, shapesample/)")
    parser.add_argument("--gt", required=True, help="folder of ground-truth <name>.ply meshes (mm)")
    parser.add_argument("--masks", help="folder of <name>_occlusion.npy masks (default: --gt)")
    parser.add_argument("--ranked-index", type=int, default=0, help="sample index reported as the ranked pick")
    parser.add_argument("--align", action="store_true", help="rigidly align each mesh to the ground truth first")
    parser.add_argument("--list", help="test.py's image list: rows in its order (default: the order recorded in "
                                       "<pred>/summary.json)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate_folder(args.pred, args.gt, args.masks, args.ranked_index, args.align, args.list)
    if args.out:
        write_json_report(args.out, report)
    print(format_report(report))
    return report


if __name__ == "__main__":
    sys.exit(exit_code(main))
