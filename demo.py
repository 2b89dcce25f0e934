"""The README's main command: OFER end to end on a fresh machine, no licensed assets needed.

1. Makes the synthetic data set (synthetic FLAME-format model, rendered faces, held-out
   test images with and without occluders) under data/synthetic/ — deterministic.
2. Trains the demo checkpoints with configs/demo/*.yml (IdGen, ExpGen, then IdRank on the
   frozen IdGen) under checkpoint/demo/, resuming or skipping what is already trained.
3. Runs test.py on the held-out test images into output/demo/.
4. Prints where the meshes and pictures are and the errors against the synthetic ground truth.

Everything here is a synthetic stand-in: the numbers say the code works, not how OFER
performs on real faces (for that, see the README's NoW evaluation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ofer.data.synthetic import GENERATOR_VERSION, SyntheticSettings, generate, generator_version
from ofer.eval.metrics import evaluate_samples, find_samples, mesh_errors
from ofer.inference.cli import main as run_test
from ofer.io import load_array, read_mesh
from ofer.train.cli import main as train

log = logging.getLogger("demo")
DATA = Path("data/synthetic")
OUT = Path("output/demo")
STAGES = (("idgen", "configs/demo/idgen.yml"), ("expgen", "configs/demo/expgen.yml"), ("idrank", "configs/demo/idrank.yml"))


def report(out: Path, gt: Path, names: list[str]) -> None:
    """Errors (mm) of the reconstructions against the synthetic ground truth, per image and mean."""
    rows = []
    template, _ = read_mesh(DATA / "flame" / "mean_shape.ply")
    for name in names:
        neutral_gt, _ = read_mesh(gt / "neutral" / f"{name}.ply")
        expr_gt, _ = read_mesh(gt / f"{name}.ply")
        occluded = load_array(gt / f"{name}_occlusion.npy", (len(expr_gt),)).astype(bool)
        best, _ = read_mesh(out / "shapesample" / f"{name}_0.ply")
        samples = np.stack([read_mesh(p)[0] for p in find_samples(out, name)])
        exp = evaluate_samples(samples, expr_gt, occluded if occluded.any() else None)
        rows.append({
            "name": name,
            "shape": mesh_errors(best, neutral_gt)["all"],
            "shape_mean_face": mesh_errors(template, neutral_gt)["all"],
            "exp_first": exp["ranked"]["all"],
            "exp_oracle": exp["oracle"]["all"],
            "exp_neutral": mesh_errors(neutral_gt, expr_gt)["all"],
            "diversity_vis": exp["diversity"]["visible"],
            "diversity_occ": exp["diversity"]["occluded"],
        })
    keys = [k for k in rows[0] if k != "name"]
    print(f"\n{'image':<14}" + "".join(f"{k:>16}" for k in keys))
    for r in rows:
        print(f"{r['name']:<14}" + "".join(f"{r[k]:>16.2f}" for k in keys))
    print(f"{'MEAN':<14}" + "".join(f"{np.nanmean([r[k] for r in rows]):>16.2f}" for k in keys))
    print(
        "\nAll values in mm (mean per-vertex distance). shape: IdRank's pick (neutral) vs the true identity; "
        "shape_mean_face: the model's mean face vs the true identity; exp_first / exp_oracle: the first / best "
        "expression sample vs the true expressive mesh; exp_neutral: the neutral true identity vs the expressive "
        "mesh (what ignoring the expression costs); diversity_*: spread of the expression samples on visible / "
        "occluded vertices (nan where an image has no occluder)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, default=SyntheticSettings.actors, help="synthetic training identities")
    p.add_argument("--opt", action="append", default=[], help="override for every training config (e.g. train.max_steps=100)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    version = generator_version(DATA)
    if version is None:
        generate(DATA, SyntheticSettings(actors=args.actors))
    elif version != GENERATOR_VERSION:
        log.error("%s was made by an older synthetic-data generator (version %s, now %s); its checkpoints "
                  "do not fit the demo configs either: delete %s and checkpoint/demo, then run demo.py again",
                  DATA, version, GENERATOR_VERSION, DATA)
        return 2
    for stage, cfg in STAGES:
        train(stage, ["--cfg", cfg, "--resume", *(arg for o in args.opt for arg in ("--opt", o))])
    ckpt = Path("checkpoint/demo")
    code = run_test([
        "--cfg", "configs/demo/test.yml",
        "--checkpoint1", str(ckpt / "idrank" / "last.tar"),
        "--checkpoint2", str(ckpt / "idgen" / "last.tar"),
        "--checkpoint3", str(ckpt / "expgen" / "last.tar"),
        "--filename", str(DATA / "test" / "list.txt"),
        "--imagepath", str(DATA / "test"),
        "--outputpath", str(OUT),
        "--device", "cpu",
    ])
    names = (DATA / "test" / "list.txt").read_text().split()
    report(OUT, DATA / "test_gt", names)
    print(f"\nMeshes: {OUT}/shapesample/*.ply (best shape), {OUT}/flamesample/*.ply (expression samples)")
    print(f"Pictures: {OUT}/<name>/overlay.png (mesh on the face), {OUT}/<name>/samples.png (expression samples)")
    print(f"Demo finished in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
