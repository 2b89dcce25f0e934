"""Compare test.py runs on the synthetic demo: the error table's MEAN row of each output folder,
and the largest |difference| of each run's samples against the first run's.

Each argument is LABEL=FOLDER, a test.py output folder over data/synthetic/test (``python -m
ofer.data.synthetic --out data/synthetic --test-only``). The first is the reference (e.g. the
CPU in float32); for the others it prints the max |difference| of the IdGen shapes, the ExpGen
expressions and jaws (the ``.npz`` files; the same seed draws the same noise on every device)
and of the 68 landmarks (in mm), how many ranked picks agree, and each MEAN column's
difference. ``--json`` writes all of it.

    python bench/demo_runs.py cpu=out/cpu cuda=out/cuda bf16_graph_b4=out/bf16 --json demo.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ofer.config import load_config
from ofer.eval.synthetic_table import COLUMNS, synthetic_table

REPO = Path(__file__).resolve().parents[1]


def samples(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Every image's arrays stacked per key: shapes, expressions, jaws, best, kpt68 (mm)."""
    out: dict[str, list[np.ndarray]] = {}
    for name in names:
        with np.load(folder / f"{name}.npz") as npz:
            for key in ("shapes", "expressions", "jaws", "best"):
                out.setdefault(key, []).append(np.asarray(npz[key], dtype=np.float64))
        out.setdefault("kpt68", []).append(np.load(folder / name / "kpt68.npy").astype(np.float64))
    return {key: np.stack(values) for key, values in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--data", type=Path, default=REPO / "data/synthetic")
    p.add_argument("--cfg", type=Path, default=REPO / "configs/demo/test.yml")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cfg = load_config(args.cfg)
    names = (args.data / "test" / "list.txt").read_text().split()
    runs = dict(run.split("=", 1) for run in args.runs)
    report: dict[str, dict] = {}
    reference = None
    print("| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS))
    for label, folder in runs.items():
        mean = synthetic_table(folder, args.data, cfg.model.jaw_scale, cfg.test.jaw_limits)["MEAN"]
        arrays = samples(Path(folder), names)
        entry = {"mean": mean}
        if reference is None:
            reference = (mean, arrays)
        else:
            ref_mean, ref = reference
            entry["max_abs_diff"] = {key: float(np.abs(arrays[key] - ref[key]).max())
                                     for key in ("shapes", "expressions", "jaws", "kpt68")}
            entry["same_pick"] = f"{int((arrays['best'] == ref['best']).sum())}/{len(names)}"
            entry["mean_diff_mm"] = {k: mean[k] - ref_mean[k] for k in COLUMNS}
        report[label] = entry
        print(f"| {label} | " + " | ".join(f"{mean[k]:.3f}" for k in COLUMNS) + " |", flush=True)
    for label, entry in report.items():
        if "max_abs_diff" in entry:
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in entry["max_abs_diff"].items())
            worst = max(abs(v) for v in entry["mean_diff_mm"].values())
            print(f"{label} vs {next(iter(runs))}: max |diff| {diffs}; same pick {entry['same_pick']}; "
                  f"largest MEAN column difference {worst:.3f} mm")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
