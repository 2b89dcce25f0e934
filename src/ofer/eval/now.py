"""NoW benchmark evaluation: scan-to-mesh distance after landmark and surface alignment (SPEC §12).

For every image in a list, the predicted neutral mesh (mm) and its 7 landmarks are compared
with the subject's scan (mm) and the scan's 7 annotated landmarks L0..L6 (outer/inner eye
corners, nose bottom, mouth corners, in NoW order):

1. crop the scan: bridge = (L1+L2)/2, centre = L4 + 0.3·(bridge − L4),
   r = 1.4·(‖L0−L3‖ + ‖bridge−L4‖)/2; keep the scan vertices within r of the centre;
2. similarity Procrustes from the predicted landmarks to the scan landmarks. As in the
   reference evaluation the SVD solution is used as is, so a reflection is not excluded
   (with seven sensible landmarks it never occurs; with degenerate ones it can);
3. refine scale, rotation and translation of the mesh to minimise the sum of squared
   distances from the cropped scan vertices to the mesh surface (`refine_similarity`:
   Levenberg–Marquardt with closest points recomputed at every evaluation);
4. the error of each cropped scan vertex is its exact distance to the mesh surface
   (triangle interior, edge or vertex).

All distances of all images are pooled before the median, mean and standard deviation
(population std) are taken — the statistics of the pooled set, not averages of per-image
statistics. The metrical track (`--metrical`) keeps the scale at 1 in steps 2 and 3, so the
prediction must be in millimetres. Note that the non-metrical track cannot see an error that
a similarity explains: a prediction that is a uniformly grown copy of a sphere-like scan
scores ≈ 0 there, and only the metrical track reports the offset.

Folder layouts (resolved per list line by `resolve_item`; change that one function to adapt):

NoW layout — list lines `<subject>/<challenge>/<image>.jpg`
(e.g. `FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg`, as in the NoW image lists):
  prediction  <pred>/<subject>/<challenge>/<image stem>.ply|.obj
              <pred>/<subject>/<challenge>/<image stem>.npy|.txt        (7, 3) landmarks
  scan        <gt>/scans/<subject>/natural_head_rotation.*.obj          (exactly one)
              <gt>/scans_lmks_onlypp/<subject>/<scan stem>*.pp          (MeshLab picked points)
  where <gt> is the NoW `final_release_version` folder. Results are also pooled per challenge.

Flat layout — list lines `<name>` without a slash:
  prediction  <pred>/<name>.ply|.obj, or test.py's <pred>/shapesample/<name>_0.ply
              <pred>/<name>_kpt7.npy | <pred>/<name>/kpt7.npy | <pred>/<name>.npy|.txt
  scan        <gt>/<name>.obj|.ply  with  <gt>/<name>.pp | <gt>/<name>_lmk7.npy

A missing prediction (mesh or landmarks) is counted and listed, not fatal; a missing or
malformed scan is an error.

Usage: python -m ofer.eval.now --pred DIR --gt DIR --list FILE [--metrical] [--out report.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from ofer.eval import write_json_report
from ofer.eval.geometry import MeshSurface, Similarity, refine_similarity, similarity_procrustes
from ofer.io import InputError, load_array, read_mesh

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 7
MESH_SUFFIXES = (".ply", ".obj")


@dataclass(frozen=True)
class NowItem:
    """Where one list entry's files are. `pred_*` is None when the prediction is missing."""

    name: str
    group: str  # the NoW challenge (multiview_neutral, ...) or "" for the flat layout
    pred_mesh: Path | None
    pred_landmarks: Path | None
    scan_mesh: Path
    scan_landmarks: Path


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def _single_match(folder: Path, pattern: str, what: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        raise InputError(f"{folder}: expected exactly one {what} matching '{pattern}', found {len(matches)}")
    return matches[0]


def resolve_item(line: str, pred_dir: Path, gt_dir: Path) -> NowItem:
    """Map one list line to its prediction and scan files (layouts in the module docstring)."""
    parts = Path(line).parts
    if len(parts) == 3:  # NoW layout: subject/challenge/image
        subject, challenge, image = parts
        base = pred_dir / subject / challenge / Path(image).stem
        scan = _single_match(gt_dir / "scans" / subject, "natural_head_rotation.*.obj", "scan")
        scan_lmk = _single_match(gt_dir / "scans_lmks_onlypp" / subject, f"{scan.stem}*.pp", "landmark file")
        return NowItem(
            name=str(Path(subject, challenge, Path(image).stem)),
            group=challenge,
            pred_mesh=_first_existing([base.with_suffix(s) for s in MESH_SUFFIXES]),
            pred_landmarks=_first_existing([base.with_suffix(".npy"), base.with_suffix(".txt")]),
            scan_mesh=scan,
            scan_landmarks=scan_lmk,
        )
    if len(parts) == 1:  # flat layout
        name = line
        scan = _first_existing([gt_dir / f"{name}{s}" for s in (".obj", ".ply")])
        scan_lmk = _first_existing([gt_dir / f"{name}.pp", gt_dir / f"{name}_lmk7.npy"])
        if scan is None or scan_lmk is None:
            raise InputError(f"{gt_dir}: no scan ({name}.obj|.ply) or scan landmarks ({name}.pp|_lmk7.npy) "
                             f"for '{name}'")
        return NowItem(
            name=name,
            group="",
            pred_mesh=_first_existing([pred_dir / f"{name}{s}" for s in MESH_SUFFIXES]
                                      + [pred_dir / "shapesample" / f"{name}_0.ply"]),  # test.py's output
            pred_landmarks=_first_existing([
                pred_dir / f"{name}_kpt7.npy", pred_dir / name / "kpt7.npy",
                pred_dir / f"{name}.npy", pred_dir / f"{name}.txt",
            ]),
            scan_mesh=scan,
            scan_landmarks=scan_lmk,
        )
    raise InputError(f"list line '{line}': expected '<subject>/<challenge>/<image>' or a plain name")


def read_picked_points(path: str | os.PathLike) -> np.ndarray:
    """Read a MeshLab PickedPoints (.pp) XML file -> (N, 3) points in file order."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
        points = [[float(p.attrib[k]) for k in "xyz"] for p in root.iter("point")]
    except (ElementTree.ParseError, KeyError, ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable MeshLab .pp file ({err!r})") from err
    if not points:
        raise InputError(f"{path}: no <point> entries")
    return np.asarray(points, dtype=np.float64)


def read_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read the 7 NoW landmarks (7, 3) from a .pp, .npy or whitespace-separated .txt file."""
    path = Path(path)
    if path.suffix == ".pp":
        points = read_picked_points(path)
    elif path.suffix == ".npy":
        points = load_array(path)
    else:
        try:
            points = np.loadtxt(path, ndmin=2)
        except (ValueError, OSError) as err:
            raise InputError(f"{path}: not a readable landmark text file ({err})") from err
    if points.shape != (NUM_LANDMARKS, 3) or not np.isfinite(points).all():
        raise InputError(f"{path}: expected {NUM_LANDMARKS} finite 3-D landmarks (7, 3), found shape {points.shape}")
    return np.asarray(points, dtype=np.float64)


def crop_scan(scan_vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of the scan vertices (N, 3) inside the NoW face sphere of landmarks (7, 3)."""
    bridge = (landmarks[1] + landmarks[2]) / 2.0  # between the inner eye corners
    nose = landmarks[4]
    centre = nose + 0.3 * (bridge - nose)
    radius = 1.4 * (np.linalg.norm(landmarks[0] - landmarks[3]) + np.linalg.norm(bridge - nose)) / 2.0
    return np.linalg.norm(scan_vertices - centre, axis=1) <= radius


@dataclass(frozen=True)
class ScanToMesh:
    """Per-image result: distances (P,) of the cropped scan vertices and the mesh -> scan transform."""

    distances: np.ndarray
    transform: Similarity


def scan_to_mesh_distances(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    pred_landmarks: np.ndarray,
    cropped_scan: np.ndarray,
    scan_landmarks: np.ndarray,
    metrical: bool = False,
) -> ScanToMesh:
    """Steps 2–4 of the protocol for one image.

    pred_vertices (V, 3), pred_faces (F, 3), pred_landmarks (7, 3): the prediction in its own
    frame; cropped_scan (P, 3), scan_landmarks (7, 3): the scan after `crop_scan`.
    """
    if len(cropped_scan) == 0:
        raise ValueError("the cropped scan is empty; check the scan landmarks")
    initial = similarity_procrustes(pred_landmarks, scan_landmarks, with_scale=not metrical, allow_reflection=True)
    surface = MeshSurface(initial.apply(pred_vertices), pred_faces)
    refined = refine_similarity(surface, cropped_scan, with_scale=not metrical)
    return ScanToMesh(refined.distances, initial.then(refined.transform))


def pooled_statistics(distances: Sequence[np.ndarray]) -> dict[str, float]:
    """Median, mean and population std of all distances pooled together, and their count."""
    pooled = np.concatenate([np.asarray(d, dtype=np.float64).ravel() for d in distances] or [np.zeros(0)])
    if pooled.size == 0:
        return {"median": math.nan, "mean": math.nan, "std": math.nan, "n_points": 0}
    return {"median": float(np.median(pooled)), "mean": float(pooled.mean()),
            "std": float(pooled.std()), "n_points": int(pooled.size)}


def read_list(path: str | os.PathLike) -> list[str]:
    """Non-empty, non-comment lines of an image list file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: list file not found")
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def evaluate_now(lines: Sequence[str], pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                 metrical: bool = False) -> dict:
    """Run the protocol over list lines; return the report (pooled, per group, per image)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    items = [resolve_item(line, pred_dir, gt_dir) for line in lines]
    scans: dict[tuple[Path, Path], tuple[np.ndarray, np.ndarray]] = {}  # one crop per subject
    per_image, missing, distances, groups = [], [], [], {}
    for index, item in enumerate(items):
        if item.pred_mesh is None or item.pred_landmarks is None:
            missing.append(item.name)
            logger.warning("missing prediction for %s", item.name)
            continue
        key = (item.scan_mesh, item.scan_landmarks)
        if key not in scans:
            scan_vertices, _ = read_mesh(item.scan_mesh)
            scan_landmarks = read_landmarks(item.scan_landmarks)
            cropped = scan_vertices[crop_scan(scan_vertices, scan_landmarks)]
            if len(cropped) == 0:
                raise InputError(f"{item.scan_landmarks}: the NoW crop keeps no vertex of {item.scan_mesh}")
            scans[key] = (cropped, scan_landmarks)
        vertices, faces = read_mesh(item.pred_mesh)
        if len(faces) == 0:
            raise InputError(f"{item.pred_mesh}: the predicted mesh has no faces")
        result = scan_to_mesh_distances(vertices, faces, read_landmarks(item.pred_landmarks), *scans[key],
                                        metrical=metrical)
        distances.append(result.distances)
        groups.setdefault(item.group, []).append(result.distances)
        per_image.append({"name": item.name, **pooled_statistics([result.distances]),
                          "scale": result.transform.scale})
        logger.info("[%d/%d] %s: median %.4f mm", index + 1, len(items), item.name, per_image[-1]["median"])
    return {
        "protocol": "NoW metrical" if metrical else "NoW non-metrical",
        "unit": "mm",
        **pooled_statistics(distances),
        "n_images": len(items),
        "n_evaluated": len(distances),
        "n_missing": len(missing),
        "missing": missing,
        "by_group": {g: {**pooled_statistics(d), "n_images": len(d)} for g, d in sorted(groups.items()) if g},
        "per_image": per_image,
    }


def format_report(report: dict) -> str:
    """The pooled statistics as a small text table (overall, then one row per group)."""
    rows = [("all", report, report["n_evaluated"])]
    rows += [(g, stats, stats["n_images"]) for g, stats in report["by_group"].items()]
    title = f"{report['protocol']} (mm)"
    lines = [f"{title:<28}{'median':>8}{'mean':>8}{'std':>8}{'images':>8}",
             *(f"{name:<28}{s['median']:>8.4f}{s['mean']:>8.4f}{s['std']:>8.4f}{n:>8d}" for name, s, n in rows),
             f"missing predictions: {report['n_missing']} of {report['n_images']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pred", required=True, help="folder of predicted meshes and landmarks")
    parser.add_argument("--gt", required=True, help="NoW final_release_version folder, or a flat scan folder")
    parser.add_argument("--list", required=True, help="image list, one entry per line")
    parser.add_argument("--metrical", action="store_true", help="metrical track: no scale in the alignment")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate_now(read_list(args.list), args.pred, args.gt, metrical=args.metrical)
    if args.out:
        write_json_report(args.out, report)
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
