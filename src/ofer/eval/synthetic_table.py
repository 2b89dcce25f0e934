"""The demo's error table: test.py outputs on the synthetic test set against its ground truth.

For each held-out synthetic image (`ofer.data.synthetic`: `<data>/test_gt/`) and test.py's
outputs for it (`<out>/shapesample/`, `<out>/flamesample/`, `<out>/<name>.npz`), all in mm
(mean per-vertex distance):

- identity: IdRank's pick, a random IdGen sample (mean over the N) and the model's mean face,
  each against the true neutral identity;
- expression with the reconstructed identity (what test.py writes): the first expression
  sample and the pick's neutral face, each against the true expressive mesh;
- expression with the true identity (as `bench/synthetic_accuracy.py` and the README's
  benchmark measure it, so only expression and jaw count): the first sample's expression and
  jaw on the true identity, and the true neutral face, against the true expressive mesh (the
  jaw posed as test.py poses it: clamped into `test.jaw_limits` when those are set);
- diversity of the saved expression samples on the visible and on the occluded vertices.

Each expression sample is compared with the neutral face of the same identity, so the two
pairs of columns read alike: a sample beats "neutral" when it gets the expression right.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ofer.config import load_config
from ofer.eval import exit_code, write_json_report
from ofer.eval.metrics import evaluate_samples, find_samples, nanmean, vertex_errors
from ofer.flame import FLAME
from ofer.flame.jaw import jaws_to_pose
from ofer.io import InputError, load_array, read_mesh

COLUMNS = {  # key -> legend
    "shape_pick": "IdRank's pick (neutral) vs the true identity",
    "shape_random": "a random IdGen sample (mean over the N) vs the true identity",
    "mean_face": "the model's mean face vs the true identity (baseline)",
    "exp_first": "first expression sample, reconstructed identity, vs the true expressive mesh",
    "exp_neutral": "the pick's neutral face vs the true expressive mesh (baseline for exp_first)",
    "exp_first*": "first sample's expression and jaw on the TRUE identity vs the true expressive mesh",
    "exp_neutral*": "the true neutral face vs the true expressive mesh (baseline for exp_first*)",
    "div_vis": "spread of the saved expression samples on the visible vertices",
    "div_occ": "the same on the occluded vertices ('-': the image has no occluder)",
}


def _mesh(path: Path) -> np.ndarray:
    vertices, _ = read_mesh(path)
    return vertices


def image_row(out: Path, gt: Path, name: str, flame: FLAME, mean_face: np.ndarray, jaw_scale: float,
              jaw_limits: Sequence[float] | None) -> dict[str, float]:
    """The table's values (mm) for one image; `flame` takes the ground truth's full shape vector."""
    neutral_gt, expr_gt = _mesh(gt / "neutral" / f"{name}.ply"), _mesh(gt / f"{name}.ply")
    occluded = load_array(gt / f"{name}_occlusion.npy", (len(expr_gt),), boolean=True)
    truth = np.load(gt / f"{name}_params.npz")
    pick = _mesh(out / "shapesample" / f"{name}_0.ply")
    sample_paths = find_samples(out, name)
    if not sample_paths:
        raise InputError(f"{out / 'flamesample'}: no expression samples of {name}")
    samples = np.stack([_mesh(p) for p in sample_paths])  # (S, V, 3)
    rec = np.load(out / f"{name}.npz")
    with torch.no_grad():
        shapes = torch.from_numpy(rec["shapes"]).float()  # (N, n_shape of IdGen)
        shapes = torch.nn.functional.pad(shapes, (0, flame.n_shape - shapes.shape[1]))
        shape_samples = flame(shapes).numpy() * 1000.0  # (N, V, 3)
        expression = torch.from_numpy(rec["expressions"][:1]).float()  # (1, n_exp of ExpGen)
        expression = torch.nn.functional.pad(expression, (0, flame.n_exp - expression.shape[1]))
        true_shape = torch.from_numpy(truth["shape"][None]).float()[:, : flame.n_shape]
        jaw = jaws_to_pose(torch.from_numpy(rec["jaws"][:1]).float(), jaw_limits)  # the .npz keeps the raw ones
        first_on_truth = flame(true_shape, expression=expression, jaw=jaw_scale * jaw)[0].numpy() * 1000.0
    spread = evaluate_samples(samples, expr_gt, occluded)["diversity"]  # an all-False mask: visible = all
    return {
        "shape_pick": float(vertex_errors(pick, neutral_gt).mean()),
        "shape_random": float(vertex_errors(shape_samples, neutral_gt).mean()),
        "mean_face": float(vertex_errors(mean_face, neutral_gt).mean()),
        "exp_first": float(vertex_errors(samples[0], expr_gt).mean()),
        "exp_neutral": float(vertex_errors(pick, expr_gt).mean()),
        "exp_first*": float(vertex_errors(first_on_truth, expr_gt).mean()),
        "exp_neutral*": float(vertex_errors(neutral_gt, expr_gt).mean()),
        "div_vis": spread["visible"],
        "div_occ": spread["occluded"],
    }


def synthetic_report(out: str | Path, data: str | Path, jaw_scale: float = 1.0,
                     jaw_limits: Sequence[float] | None = None) -> dict:
    """Rows per image of `<data>/test/list.txt` (list order) with outputs in `out`, plus "MEAN"
    (mean over the images that have a value), and the images without outputs (`missing`).

    `jaw_scale` and `jaw_limits` are the test config's `model.jaw_scale` (the demo's is 1.0) and
    `test.jaw_limits`, so that the true identity is posed with the jaw test.py posed.
    """
    out, data = Path(out), Path(data)
    if not out.is_dir():
        raise InputError(f"{out}: prediction folder not found (test.py's --outputpath)")
    gt = data / "test_gt"
    listing = data / "test" / "list.txt"
    if not listing.is_file():
        raise InputError(f"{listing}: not found; --data must be a synthetic data set (python -m ofer.data.synthetic)")
    flame = FLAME(str(data / "flame" / "generic_model.pkl"), n_shape=300, n_exp=50)
    mean_face = _mesh(data / "flame" / "mean_shape.ply")
    names = listing.read_text().split()
    missing = [n for n in names if not (out / "shapesample" / f"{n}_0.ply").is_file() or not find_samples(out, n)]
    rows = {name: image_row(out, gt, name, flame, mean_face, jaw_scale, jaw_limits) for name in names
            if name not in missing}
    rows["MEAN"] = {k: nanmean([r[k] for r in rows.values()]) for k in COLUMNS}
    return {"unit": "mm", "rows": rows, "missing": missing, "n_images": len(names), "n_missing": len(missing)}


def synthetic_table(out: str | Path, data: str | Path, jaw_scale: float = 1.0,
                    jaw_limits: Sequence[float] | None = None) -> dict[str, dict[str, float]]:
    """The rows of `synthetic_report`; every listed image must have outputs (else InputError naming them)."""
    report = synthetic_report(out, data, jaw_scale, jaw_limits)
    if report["missing"]:
        raise InputError(f"{out}: no outputs of {', '.join(report['missing'])}")
    return report["rows"]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The rows as text with a legend; values in mm."""
    lines = [f"{'image':<14}" + "".join(f"{k:>13}" for k in COLUMNS)]
    for name, row in rows.items():
        lines.append(f"{name:<14}" + "".join(f"{'-' if math.isnan(row[k]) else f'{row[k]:.2f}':>13}" for k in COLUMNS))
    lines.append("\nAll values in mm (mean per-vertex distance); lower errors are better.")
    lines += [f"  {k:<13} {text}" for k, text in COLUMNS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m ofer.eval.synthetic_table --pred OUT --data DATA`: the demo's table for any output folder."""
    parser = argparse.ArgumentParser(
        prog="python -m ofer.eval.synthetic_table",
        description="Errors of test.py's outputs on the synthetic test set against its ground truth (the demo's table).",
        epilog="exit codes: 0 every image evaluated, 1 some have no outputs (listed), 2 bad input")
    parser.add_argument("--pred", required=True, help="test.py's --outputpath")
    parser.add_argument("--data", default="data/synthetic", help="the synthetic data set (default data/synthetic)")
    parser.add_argument("--cfg", help="the test config, for model.jaw_scale and test.jaw_limits (default: the "
                                      "settings recorded in <pred>/summary.json, else jaw_scale 1 and no limits)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.pred).is_dir():
        raise InputError(f"{args.pred}: prediction folder not found (test.py's --outputpath)")
    jaw_scale, jaw_limits = _jaw_settings(Path(args.pred), args.cfg)
    report = synthetic_report(args.pred, args.data, jaw_scale, jaw_limits)
    if args.out:
        write_json_report(args.out, report)
    print(format_table(report["rows"]))
    if report["missing"]:
        print(f"no outputs for {report['n_missing']} of {report['n_images']} images: {', '.join(report['missing'])}")
    return report


def _jaw_settings(pred: Path, cfg: str | None) -> tuple[float, list[float] | None]:
    """(jaw_scale, jaw_limits) test.py posed the jaw with: from `cfg`, else the run's summary.json."""
    if cfg is not None:
        config = load_config(cfg)
        return config.model.jaw_scale, config.test.jaw_limits
    try:
        settings = json.loads((pred / "summary.json").read_text())["settings"]
        return float(settings["jaw_scale"]), settings.get("jaw_limits")
    except (OSError, ValueError, KeyError, TypeError):
        logging.getLogger(__name__).warning("%s: no readable settings; posing the true identity with jaw_scale 1 "
                                            "and no jaw limits (give --cfg)", pred / "summary.json")
        return 1.0, None


if __name__ == "__main__":
    sys.exit(exit_code(main))
