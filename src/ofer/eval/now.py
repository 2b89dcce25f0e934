"""NoW benchmark evaluation: scan-to-mesh distance after landmark and surface alignment.

For every image in a list, the predicted neutral mesh (mm) and its 7 landmarks are compared
with the subject's scan (mm) and the scan's 7 annotated landmarks L0..L6 (outer/inner eye
corners, nose bottom, mouth corners, in NoW order):

1. crop the scan: bridge = (L1+L2)/2, centre = L4 + 0.3·(bridge − L4),
   r = 1.4·(‖L0−L3‖ + ‖bridge−L4‖)/2; keep the scan vertices within r of the centre. Scans
   are read with every vertex as stored (`ofer.eval.scans.read_scan_vertices`: the `v` lines
   of an .obj, the vertex element of a .ply; no splitting at texture seams, no dropping);
2. similarity Procrustes from the predicted landmarks to the scan landmarks. As in the
   reference evaluation the SVD solution is used as is, so a reflection is not excluded; a
   reflection (left/right swapped landmarks) or a large landmark residual is warned about;
3. refine scale, rotation and translation of the mesh to minimise the sum of squared
   distances from the cropped scan vertices to the mesh surface. Default (`official`): the
   reference's dogleg rotating about the origin, stopping when a step gains less than 1e-4 of
   the sum of squares or after 200 steps (`refine_dogleg`); `converged`: ours, run on to a
   relative gain of 1e-6 about the scan's centroid (`refine_similarity`). Both keep the scale
   positive (the reference's penalty let it cross zero on degenerate meshes);
4. the error of each cropped scan vertex is its exact distance to the mesh surface
   (triangle interior, edge or vertex).

All distances of all images are pooled before the median, mean and standard deviation
(population std) are taken — the statistics of the pooled set, not averages of per-image
statistics. The metrical track (`--metrical`) keeps the scale fixed: the prediction is scaled
by the factor of its unit (`--unit mm|cm|m`, default mm, the unit test.py writes; the
reference's default is m) and only rotated and moved. As in the reference, the landmark fit's
translation is the one of the scaled fit. A prediction whose size says another unit (its
outer eye corners more than 3 times nearer or farther than the scan's) is an error naming the
unit that fits. Note that the non-metrical track cannot see an error that a similarity
explains: a prediction that is a uniformly grown copy of a sphere-like scan scores ≈ 0 there,
and only the metrical track reports the offset.

Folder layouts (resolved per list line by `resolve_item`; change that one function to adapt):

NoW layout — list lines `<subject>/<challenge>/<image>.jpg`
(e.g. `FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg`, as in the NoW image lists):
  prediction  <pred>/<subject>/<challenge>/<image stem>.obj|.ply  (.obj first, as the reference)
              <pred>/<subject>/<challenge>/<image stem>.npy|.txt  (7, 3) or (1, 7, 3) landmarks
              or test.py's <pred>/shapesample/<subject>/<challenge>/<stem>_0.ply|.obj with
              <pred>/<subject>/<challenge>/<stem>/kpt7.npy
  scan        <gt>/scans/<subject>/*.obj                  the first in name order, as the reference
              <gt>/scans_lmks_onlypp/<subject>/*.pp       (MeshLab picked points), likewise
  where <gt> is the NoW `final_release_version` folder. Results are also pooled per challenge.
  (The reference, now_evaluation's compute_error.py, takes the first match of these two globs;
  we sort the matches so the pick does not depend on the file system, and warn when there are
  several.)

Flat layout — list lines `<name>` without a slash:
  prediction  <pred>/<name>.obj|.ply, or test.py's <pred>/shapesample/<name>_0.ply|.obj
              <pred>/<name>_kpt7.npy | <pred>/<name>/kpt7.npy | <pred>/<name>.npy|.txt
  scan        <gt>/<name>.obj|.ply  with  <gt>/<name>.pp | <gt>/<name>_lmk7.npy

A missing prediction (mesh or landmarks) is counted and listed, not fatal; a missing or
malformed scan (non-finite vertices or landmarks included) is an error, and so is a prediction
NoW cannot measure (`check_prediction`: face indices outside the vertices, non-finite
vertices, fewer than 100 triangles of non-zero area, a size no unit explains, landmarks not of
the mesh's size): one error naming the file, exit 2, rather than a meaningless number. `--check-alignment DIR` writes, per image, the aligned prediction
and the cropped scan (`DIR/<name>/aligned_prediction.ply`, `cropped_scan.ply`) for inspection.

Usage: python -m ofer.eval.now --pred DIR --gt DIR --list FILE [--metrical [--unit mm|cm|m]]
       [--refinement official|converged] [--check-alignment DIR] [--out report.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from ofer.eval import exit_code, write_json_report
from ofer.eval.geometry import MeshSurface, Similarity, refine_dogleg, refine_similarity, similarity_procrustes
from ofer.eval.scans import read_scan_vertices
from ofer.io import InputError, check_values, list_entries, load_array, read_mesh, write_ply

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 7
# The reference reads IMG.obj where both IMG.obj and IMG.ply exist (now_evaluation, compute_error.py).
MESH_SUFFIXES = (".obj", ".ply")
UNIT_FACTORS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}  # prediction unit -> millimetres (the scans' unit)
REFINEMENTS = ("official", "converged")
UNIT_RATIO_LIMIT = 3.0  # units differ by 10x: a face 3x too small or large says another unit
LANDMARK_RMS_WARNING_MM = 10.0  # 7-landmark fit residual (RMS, mm) above which a mistake is likely
# Predictions NoW cannot measure are refused (`check_prediction`): a face mesh has thousands of
# triangles (FLAME 9,976) and, in any unit a head is given in (~0.3 m, 30 cm, 300 mm), a
# bounding-box diagonal within these limits; its outer eye corners span about a fifth to a half of it.
MIN_TRIANGLES = 100
MESH_SIZE_LIMITS = (0.01, 10_000.0)
EYE_SPAN_TO_MESH_LIMITS = (0.02, 2.0)


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


def _first_match(folder: Path, pattern: str, what: str) -> Path:
    """The reference's rule: the first file matching `pattern` in `folder` (sorted; warn if several)."""
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise InputError(f"{folder}: no {what} matching '{pattern}'")
    if len(matches) > 1:
        logger.warning("%s: %d files match '%s'; using %s as the reference's first match", folder,
                       len(matches), pattern, matches[0].name)
    return matches[0]


def _prediction_mesh(pred_dir: Path, stem: str) -> Path | None:
    """`<pred>/<stem>.obj|.ply` (.obj first, as the reference), else test.py's `<pred>/shapesample/<stem>_0.ply|.obj`.

    Both layouts find the mesh alike; `stem` is the list line without the image's suffix.
    """
    return _first_existing([pred_dir / f"{stem}{suffix}" for suffix in MESH_SUFFIXES]
                           + [pred_dir / "shapesample" / f"{stem}_0{suffix}" for suffix in (".ply", ".obj")])


def resolve_item(line: str, pred_dir: Path, gt_dir: Path) -> NowItem:
    """Map one list line to its prediction and scan files (layouts in the module docstring)."""
    parts = Path(line).parts
    if len(parts) == 3:  # NoW layout: subject/challenge/image
        subject, challenge, image = parts
        stem = str(Path(subject, challenge, Path(image).stem))
        return NowItem(
            name=stem,
            group=challenge,
            pred_mesh=_prediction_mesh(pred_dir, stem),
            pred_landmarks=_first_existing([pred_dir / f"{stem}.npy", pred_dir / f"{stem}.txt",
                                            pred_dir / stem / "kpt7.npy"]),
            scan_mesh=_first_match(gt_dir / "scans" / subject, "*.obj", "scan"),
            scan_landmarks=_first_match(gt_dir / "scans_lmks_onlypp" / subject, "*.pp", "landmark file"),
        )
    if len(parts) == 1:  # flat layout
        name = line
        scan = _first_existing([gt_dir / f"{name}{s}" for s in MESH_SUFFIXES])
        scan_lmk = _first_existing([gt_dir / f"{name}.pp", gt_dir / f"{name}_lmk7.npy"])
        if scan is None or scan_lmk is None:
            raise InputError(f"{gt_dir}: no scan ({name}.obj|.ply) or scan landmarks ({name}.pp|_lmk7.npy) "
                             f"for '{name}'")
        return NowItem(
            name=name,
            group="",
            pred_mesh=_prediction_mesh(pred_dir, name),
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
    """Read the 7 NoW landmarks (7, 3) from a .pp, .npy or whitespace-separated .txt file.

    Arrays of shape (1, 7, 3) are accepted as (7, 3), as the reference accepts them.
    """
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
    if points.shape == (1, NUM_LANDMARKS, 3):
        points = points[0]
    if points.shape != (NUM_LANDMARKS, 3):
        raise InputError(f"{path}: expected {NUM_LANDMARKS} 3-D landmarks (7, 3), found shape {points.shape}")
    check_values(f"{path}: landmarks", points, -np.inf, np.inf)  # NaN or infinite values
    points = np.asarray(points, dtype=np.float64)
    if np.linalg.norm(points - points.mean(0), axis=1).max() == 0:
        raise InputError(f"{path}: the {NUM_LANDMARKS} landmarks coincide")
    return points


def check_prediction(vertices: np.ndarray, faces: np.ndarray, landmarks: np.ndarray, mesh_path: Path,
                     landmark_path: Path) -> None:
    """Refuse a predicted mesh (V, 3), faces (F, 3) and its landmarks (7, 3) that NoW cannot measure.

    Each error names the file: face indices outside the vertices, non-finite vertices, fewer
    than MIN_TRIANGLES triangles of non-zero area, a size no unit explains (MESH_SIZE_LIMITS,
    bounding-box diagonal), or landmarks whose outer eye corners do not fit the mesh's size
    (another unit or another mesh). Such a mesh would otherwise be "aligned" to a scan anyway
    and give a meaningless number.
    """
    if len(faces) == 0:
        raise InputError(f"{mesh_path}: the predicted mesh has no faces")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise InputError(f"{mesh_path}: face indices span {faces.min()}..{faces.max()}, outside the "
                         f"{len(vertices)} vertices (0..{len(vertices) - 1})")
    check_values(f"{mesh_path}: vertices", vertices, -np.inf, np.inf)
    diagonal = float(np.linalg.norm(np.ptp(vertices[faces.ravel()], axis=0)))
    low, high = MESH_SIZE_LIMITS
    if not low <= diagonal <= high:
        raise InputError(f"{mesh_path}: the mesh is {diagonal:.3g} across (bounding-box diagonal), outside "
                         f"{low:g}..{high:g} in any unit a head is given in (about 0.3 m, 30 cm, 300 mm)")
    corners = vertices[faces]  # (F, 3, 3)
    areas = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1) / 2
    n_real = int((areas > 1e-12 * diagonal**2).sum())
    if n_real < MIN_TRIANGLES:
        raise InputError(f"{mesh_path}: only {n_real} triangle(s) of non-zero area (at least {MIN_TRIANGLES}; "
                         "a face mesh has thousands)")
    ratio = float(np.linalg.norm(landmarks[0] - landmarks[3])) / diagonal
    low, high = EYE_SPAN_TO_MESH_LIMITS
    if not low <= ratio <= high:
        raise InputError(f"{landmark_path}: the outer eye corners (L0, L3) are {ratio:.3g} times the size of "
                         f"the mesh {mesh_path} (expected {low:g}..{high:g}): landmarks and mesh in different units, "
                         "or not the same face?")


def crop_scan(scan_vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of the scan vertices (N, 3) inside the NoW face sphere of landmarks (7, 3)."""
    bridge = (landmarks[1] + landmarks[2]) / 2.0  # between the inner eye corners
    nose = landmarks[4]
    centre = nose + 0.3 * (bridge - nose)
    radius = 1.4 * (np.linalg.norm(landmarks[0] - landmarks[3]) + np.linalg.norm(bridge - nose)) / 2.0
    return np.linalg.norm(scan_vertices - centre, axis=1) <= radius


@dataclass(frozen=True)
class ScanToMesh:
    """Per-image result: distances (P,) of the cropped scan vertices, the mesh -> scan transform,
    and how well the 7 landmarks fitted (RMS in mm after step 2; whether that fit reflects)."""

    distances: np.ndarray
    transform: Similarity
    landmark_rms: float
    reflection: bool


def landmark_fit(pred_landmarks: np.ndarray, scan_landmarks: np.ndarray, unit_factor: float | None) -> Similarity:
    """Step 2: the similarity from predicted to scan landmarks (7, 3), reflections allowed.

    `unit_factor` None: non-metrical, the fitted scale is kept. Otherwise (metrical) the scale is
    the unit factor while rotation and translation stay those of the scaled fit, as in the
    reference (its translation is computed with the fitted scale).
    """
    fit = similarity_procrustes(pred_landmarks, scan_landmarks, with_scale=True, allow_reflection=True)
    return fit if unit_factor is None else Similarity(unit_factor, fit.rotation, fit.translation)


def scan_to_mesh_distances(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    pred_landmarks: np.ndarray,
    cropped_scan: np.ndarray,
    scan_landmarks: np.ndarray,
    metrical: bool = False,
    unit_factor: float = 1.0,
    refinement: str = "official",
) -> ScanToMesh:
    """Steps 2–4 of the protocol for one image.

    pred_vertices (V, 3), pred_faces (F, 3), pred_landmarks (7, 3): the prediction in its own
    frame (and unit: `unit_factor` converts it to mm on the metrical track); cropped_scan
    (P, 3), scan_landmarks (7, 3): the scan after `crop_scan`, in mm. `refinement`: "official"
    (`refine_dogleg`) or "converged" (`refine_similarity`).
    """
    if len(cropped_scan) == 0:
        raise ValueError("the cropped scan is empty; check the scan landmarks")
    if refinement not in REFINEMENTS:
        raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")
    initial = landmark_fit(pred_landmarks, scan_landmarks, unit_factor if metrical else None)
    residual = initial.apply(pred_landmarks) - scan_landmarks  # (7, 3) mm
    surface = MeshSurface(initial.apply(pred_vertices), pred_faces)
    refine = refine_dogleg if refinement == "official" else refine_similarity
    refined = refine(surface, cropped_scan, with_scale=not metrical)
    return ScanToMesh(refined.distances, initial.then(refined.transform),
                      landmark_rms=float(np.sqrt((residual**2).sum(1).mean())),
                      reflection=bool(np.linalg.det(initial.rotation) < 0))


def check_unit(pred_landmarks: np.ndarray, scan_landmarks: np.ndarray, unit: str, source: Path) -> None:
    """Metrical track: refuse a prediction whose size says another unit than `unit`.

    Compares the outer-eye-corner distance (L0–L3) of the prediction, converted to mm, with the
    scan's; units differ by factors of 10, so a ratio beyond 3 means a wrong unit.
    """
    span = float(np.linalg.norm(pred_landmarks[0] - pred_landmarks[3]))
    scan_span = float(np.linalg.norm(scan_landmarks[0] - scan_landmarks[3]))
    ratio = span * UNIT_FACTORS[unit] / scan_span
    if 1.0 / UNIT_RATIO_LIMIT < ratio < UNIT_RATIO_LIMIT:
        return
    fits = min(UNIT_FACTORS, key=lambda u: abs(math.log(span * UNIT_FACTORS[u] / scan_span)))
    raise InputError(
        f"{source}: read in {unit}, the predicted outer eye corners are {span * UNIT_FACTORS[unit]:.4g} mm apart "
        f"against the scan's {scan_span:.1f} mm; the prediction looks like it is in {fits}: pass --unit {fits}"
    )


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
    return [entry for _, entry in list_entries(path)]


def evaluate_now(lines: Sequence[str], pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                 metrical: bool = False, unit: str = "mm", refinement: str = "official",
                 check_alignment: str | os.PathLike | None = None) -> dict:
    """Run the protocol over list lines; return the report (pooled, per group, per image).

    `unit` (mm, cm, m) is the predictions' unit on the metrical track; `check_alignment`, a
    folder to write each image's aligned prediction and cropped scan to.
    """
    if unit not in UNIT_FACTORS:
        raise ValueError(f"unit must be one of {sorted(UNIT_FACTORS)}, got {unit!r}")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction folder (test.py's --outputpath)"),
                         (gt_dir, "ground-truth folder (NoW's final_release_version, or a flat scan folder)")):
        if not folder.is_dir():
            raise InputError(f"{folder}: {what} not found")
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
            scan_vertices = read_scan_vertices(item.scan_mesh)
            scan_landmarks = read_landmarks(item.scan_landmarks)
            cropped = scan_vertices[crop_scan(scan_vertices, scan_landmarks)]
            if len(cropped) == 0:
                raise InputError(f"{item.scan_landmarks}: the NoW crop keeps no vertex of {item.scan_mesh}")
            scans[key] = (cropped, scan_landmarks)
        vertices, faces = read_mesh(item.pred_mesh)
        pred_landmarks = read_landmarks(item.pred_landmarks)
        check_prediction(vertices, faces, pred_landmarks, item.pred_mesh, item.pred_landmarks)
        if metrical:
            check_unit(pred_landmarks, scans[key][1], unit, item.pred_landmarks)
        result = scan_to_mesh_distances(vertices, faces, pred_landmarks, *scans[key], metrical=metrical,
                                        unit_factor=UNIT_FACTORS[unit], refinement=refinement)
        if result.reflection:
            logger.warning("%s: the 7-landmark fit is a reflection: are the predicted landmarks left/right "
                           "swapped or out of the NoW order (%s)?", item.name, item.pred_landmarks)
        if result.landmark_rms > LANDMARK_RMS_WARNING_MM:
            logger.warning("%s: the 7 landmarks fit the scan's with %.1f mm RMS (over %.0f mm): check their order "
                           "and that they belong to the mesh (%s)", item.name, result.landmark_rms,
                           LANDMARK_RMS_WARNING_MM, item.pred_landmarks)
        if check_alignment is not None:
            folder = Path(check_alignment) / item.name
            write_ply(folder / "aligned_prediction.ply", result.transform.apply(vertices), faces)
            write_ply(folder / "cropped_scan.ply", scans[key][0], np.zeros((0, 3), dtype=np.int64))
        distances.append(result.distances)
        groups.setdefault(item.group, []).append(result.distances)
        per_image.append({"name": item.name, **pooled_statistics([result.distances]),
                          "scale": result.transform.scale, "landmark_rms_mm": result.landmark_rms,
                          "reflection": result.reflection})
        logger.info("[%d/%d] %s: median %.4f mm", index + 1, len(items), item.name, per_image[-1]["median"])
    return {
        "protocol": "NoW metrical" if metrical else "NoW non-metrical",
        "unit": "mm",
        "prediction_unit": unit if metrical else None,
        "refinement": refinement,
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
    setting = f"refinement: {report['refinement']}"
    if report["prediction_unit"] is not None:
        setting += f"; predictions read in {report['prediction_unit']} (--unit)"
    lines = [f"{title:<28}{'median':>8}{'mean':>8}{'std':>8}{'images':>8}",
             *(f"{name:<28}{s['median']:>8.4f}{s['mean']:>8.4f}{s['std']:>8.4f}{n:>8d}" for name, s, n in rows),
             f"missing predictions: {report['n_missing']} of {report['n_images']}", setting]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    layouts = __doc__[__doc__.index("Folder layouts"):__doc__.index("A missing prediction")]
    parser = argparse.ArgumentParser(prog="python -m ofer.eval.now", description=__doc__.split("\n")[0],
                                     epilog=layouts + "Landmark files: .pp is MeshLab's picked-points XML (7 <point "
                                     "x= y= z=> in NoW order); .npy/.txt hold (7, 3) or (1, 7, 3) numbers.\n"
                                     "exit codes: 0 every image evaluated, 1 predictions missing, 2 bad input",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of predicted meshes and landmarks")
    parser.add_argument("--gt", required=True, help="NoW final_release_version folder, or a flat scan folder")
    parser.add_argument("--list", required=True, help="image list, one entry per line")
    parser.add_argument("--metrical", action="store_true", help="metrical track: no scale in the alignment")
    parser.add_argument("--unit", choices=sorted(UNIT_FACTORS), default="mm",
                        help="metrical track: the predictions' unit (default mm, as test.py writes; "
                             "the official script's default is m)")
    parser.add_argument("--refinement", choices=REFINEMENTS, default="official",
                        help="official: the reference's dogleg and stop rule (default); converged: ours, "
                             "run on to a 1e-6 relative gain")
    parser.add_argument("--check-alignment", metavar="DIR",
                        help="write each image's aligned prediction and cropped scan here")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.metrical:
        logger.info("metrical track: predictions read in %s (--unit)", args.unit)
    report = evaluate_now(read_list(args.list), args.pred, args.gt, metrical=args.metrical, unit=args.unit,
                          refinement=args.refinement, check_alignment=args.check_alignment)
    if args.out:
        write_json_report(args.out, report)
    print(format_report(report))
    return report


if __name__ == "__main__":
    sys.exit(exit_code(main))
