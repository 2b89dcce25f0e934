"""Does the spread of the samples mean anything? Spread against occlusion and against the error, per sampler.

Runs the pipeline (the bundled demo models, configs/demo/test.yml: N = 32 shapes, M = 16
expressions, its jaw limits) on held-out synthetic test faces, half of them with an occluder,
whose ground truth includes the vertices the occluder covers (`ofer.data.synthetic`:
`test_gt/<name>_occlusion.npy`). For each sampler setting and each spread map it prints:

- the mean spread on the visible and on the occluded vertices of the occluded images, the mean
  spread on those same vertices in the images without an occluder (are they vertices that vary
  more anyway?), and the visible and occluded errors (mean over images ± one standard error);
- the Spearman rank correlation between a vertex's spread and its error, pooled over all the
  vertices of all images (± a jackknife standard error, leaving out one image at a time), and
  the mean of the per-image correlations (± one standard error over images): the first says
  whether larger spreads go with larger errors anywhere, the second whether they do within an
  image, i.e. whether the map points at the wrong part of the face. The last column is the
  baseline that knows nothing of the image: the per-image correlation of the error with the
  mean spread map of the other images; only what a map gains over it (`own - mean map`, paired
  over the images) is the image's own.

Maps and their errors (per vertex, mm): `shape`: the spread of the N neutral IdGen samples
against the error of IdRank's pick (shapesample/<name>_0.ply) to the true neutral face;
`expression`: the spread of the M expressive meshes against the error of the first one
(flamesample/<name>_0_0.ply) to the true expressive face; `expression*`: the same spread
against the error of the first sample's expression and jaw put on the TRUE identity (only
expression and jaw count, as the README's benchmark measures them).

By default it makes its own test set of `--images` faces in a temporary folder (seconds: the
test set has its own random stream, independent of the training actors, so these faces are
held out); `--data DIR` uses the test set of an existing synthetic data set instead.

    python bench/uncertainty_accuracy.py --images 80 --settings "ddim 25" "dpmpp_2m 10" "ddpm 1000"
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from synthetic_accuracy import REPO, SETTINGS, data_overrides, stage_checkpoint

from ofer.api import image_generator
from ofer.config import load_config
from ofer.data.synthetic import SyntheticSettings, generate
from ofer.eval.metrics import vertex_errors
from ofer.flame import FLAME
from ofer.flame.jaw import jaws_to_pose
from ofer.inference.cli import read_list
from ofer.inference.pipeline import OferPipeline, load_inputs
from ofer.io import load_array, read_mesh

MAPS = ("shape", "expression", "expression*")


@torch.no_grad()
def vertex_records(pipe: OferPipeline, truth_flame: FLAME, data: Path, seed: int) -> list[dict[str, np.ndarray]]:
    """Per image: the occlusion mask (V,) and, per map, the spread and the error per vertex (V,) in mm."""
    gt = data / "test_gt"
    records = []
    for name, path in read_list(data / "test" / "list.txt", data / "test"):
        crop, arcface = load_inputs(path)
        rec = pipe(crop[None], arcface[None], [image_generator(seed, name)])[0]
        neutral_gt, expr_gt = read_mesh(gt / "neutral" / f"{name}.ply")[0], read_mesh(gt / f"{name}.ply")[0]
        truth = np.load(gt / f"{name}_params.npz")
        expression = torch.nn.functional.pad(torch.from_numpy(rec.expressions[:1]).float(),
                                             (0, truth_flame.n_exp - rec.expressions.shape[1]))
        jaw = jaws_to_pose(torch.from_numpy(rec.jaws[:1]).float(), pipe.test.jaw_limits)  # as the pipeline posed it
        first_on_truth = truth_flame(torch.from_numpy(truth["shape"][None]).float(), expression=expression,
                                     jaw=pipe.jaw_scale * jaw)[0].numpy() * 1000.0
        records.append({
            "occluded": load_array(gt / f"{name}_occlusion.npy", (len(expr_gt),), boolean=True),
            "shape": (rec.shape_spread_mm, vertex_errors(rec.neutral_mm, neutral_gt)),
            "expression": (rec.expression_spread_mm, vertex_errors(rec.expression_mm[0], expr_gt)),
            "expression*": (rec.expression_spread_mm, vertex_errors(first_on_truth, expr_gt)),
        })
    return records


def mean_se(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def pooled_spearman(spreads: list[np.ndarray], errors: list[np.ndarray]) -> tuple[float, float]:
    """Spearman's rho over all (image, vertex) pairs, and its jackknife standard error over images."""
    def rho(keep: list[int]) -> float:
        return float(spearmanr(np.concatenate([spreads[i] for i in keep]),
                               np.concatenate([errors[i] for i in keep])).statistic)

    everything = list(range(len(spreads)))
    leave_one_out = np.array([rho([j for j in everything if j != i]) for i in everything])
    n = len(everything)
    return rho(everything), float(math.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()))


def map_row(records: list[dict[str, np.ndarray]], key: str) -> dict[str, tuple[float, float]]:
    """The table's values for one map: (mean, standard error) each."""
    occluded = [r for r in records if r["occluded"].any()]
    clear = [r for r in records if not r["occluded"].any()]
    row = {}
    for part, index in (("spread", 0), ("error", 1)):
        row[f"{part} visible"] = mean_se([r[key][index][~r["occluded"]].mean() for r in occluded])
        row[f"{part} occluded"] = mean_se([r[key][index][r["occluded"]].mean() for r in occluded])
    # The occluded vertices may be ones that vary more anyway: their spread on the images without an occluder.
    row["spread occluded, clear images"] = mean_se([np.mean([c[key][0][r["occluded"]].mean() for c in clear])
                                                    for r in occluded])
    spreads, errors = [r[key][0] for r in records], [r[key][1] for r in records]
    row["rho pooled"] = pooled_spearman(spreads, errors)
    own = np.array([spearmanr(s, e).statistic for s, e in zip(spreads, errors)])  # (images,)
    # The image-independent baseline: the mean spread map of the other images against this image's error.
    total = np.sum(spreads, axis=0)
    others = np.array([spearmanr((total - s) / (len(spreads) - 1), e).statistic for s, e in zip(spreads, errors)])
    row["rho within image"], row["rho within, others' mean map"] = mean_se(own), mean_se(others)
    row["own - mean map"] = mean_se(own - others)  # paired over the images
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=80, help="size of the test set made when --data is not given")
    p.add_argument("--data", type=Path, default=None, help="a synthetic data set whose test/ and test_gt/ to use")
    p.add_argument("--settings", nargs="*", default=["ddim 25", "dpmpp_2m 10", "ddpm 1000"], choices=list(SETTINGS))
    p.add_argument("--num-shapes", type=int, default=32)
    p.add_argument("--num-expressions", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", type=Path, default=REPO / "models" / "demo")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or generate(Path(tmp) / "synthetic", SyntheticSettings(test_images=args.images), training=False)
        cfg = load_config(REPO / "configs" / "demo" / "test.yml",
                          [f"test.numsamples={args.num_shapes}", f"test.num_expressions={args.num_expressions}",
                           *[o for o in data_overrides(data) if o.startswith("model.")]])
        paths = {stage: stage_checkpoint(args.checkpoints, stage) for stage in ("idgen", "expgen", "idrank")}
        pipe = OferPipeline.from_checkpoints(cfg, paths["idrank"], paths["idgen"], paths["expgen"], torch.device("cpu"))
        truth_flame = FLAME(cfg.model.flame_model_path, n_shape=300, n_exp=50)
        results = {}
        for label in args.settings:
            sampler, steps = SETTINGS[label]
            pipe.test.sampling, pipe.test.steps, pipe.test.exp_sampling, pipe.test.exp_steps = sampler, steps, sampler, steps
            start = time.perf_counter()
            records = vertex_records(pipe, truth_flame, data, args.seed)
            results[label] = {key: map_row(records, key) for key in MAPS}
            print(f"{label}: {len(records)} images ({sum(r['occluded'].any() for r in records)} occluded), "
                  f"{(time.perf_counter() - start) / len(records):.2f} s/image", flush=True)
    columns = ("spread visible", "spread occluded", "spread occluded, clear images", "error visible", "error occluded",
               "rho pooled", "rho within image", "rho within, others' mean map", "own - mean map")
    print(f"\nN = {args.num_shapes}, M = {args.num_expressions}; spreads and errors in mm (occluded images only), "
          "rho: Spearman between a vertex's spread and its error; ± one standard error\n")
    print("| sampler | map | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for label, rows in results.items():
        for key, row in rows.items():
            digits = [3 if c.startswith("rho") or c == "own - mean map" else 2 for c in columns]
            cells = [f"{row[c][0]:.{d}f} ± {row[c][1]:.{d}f}" for c, d in zip(columns, digits)]
            print(f"| {label} | {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
