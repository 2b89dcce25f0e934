"""Accuracy and diversity of the demo checkpoints on held-out synthetic faces, per sampler.

Runs the whole pipeline on frames of the held-out SYNTHVAL actors (never seen in
training) and compares with their ground truth, for each sampler setting (the same sampler
for IdGen and ExpGen). All errors are mean per-vertex distances in mm:

- shape: IdRank's pick, a random IdGen sample (mean over the N), the best sample
  (oracle), the average of the N sample meshes (the paper's "average of samples"), and the
  model's mean face as the baseline; shape diversity is the per-vertex spread of the N samples;
- expression: ExpGen's samples applied to the TRUE identity (so only expression and jaw
  are measured; the jaw posed as test.py poses it, clamped into `test.jaw_limits`
  when set): the first sample, the best (oracle), and the neutral face as the baseline;
  expression diversity is the spread of the M samples.

It also prints each demo checkpoint's training time. Uses the bundled demo models by default
(`--checkpoints checkpoint/demo` for your own `python demo.py --train`) and needs the full
synthetic data set with its SYNTHVAL actors (`python -m ofer.data.synthetic --out
data/synthetic`, or `python demo.py --train`); `--data` points at it elsewhere.

After the table, each setting is compared with the first one listed (put `ddpm 1000`
first): the relative change of the IdRank pick's error, of the first expression sample's
error and of the mean error over all M expression samples (the same expectation as the
first sample's, with less sampling noise), each with the standard error of the per-image
paired difference, so that a few-step solver can be judged against DDPM. With `--seeds K`
every frame is reconstructed K times (seeds --seed … --seed+K−1) and its metrics are the
mean over the K runs, which shrinks the sampling noise of the one-sample columns. Example:

    python bench/synthetic_accuracy.py --images 24 --settings "ddpm 1000" "dpmpp_2m 10" "unipc 10"
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from ofer.checkpoints import read_checkpoint
from ofer.config import load_config
from ofer.data.datasets import ExpressionDataset
from ofer.eval.metrics import diversity, vertex_errors
from ofer.flame import FLAME
from ofer.flame.jaw import jaws_to_pose
from ofer.inference.pipeline import OferPipeline
from ofer.io import InputError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # label -> (sampler, steps)
    "ddpm 1000": ("ddpm", None),
    "ddim_legacy": ("ddim_legacy", None),
    "ddim 250": ("ddim", 250),
    "ddim 50": ("ddim", 50),
    "ddim 25": ("ddim", 25),
    "ddim 10": ("ddim", 10),
    **{f"{solver} {steps}": (solver, steps) for solver in ("dpmpp_2m", "unipc") for steps in (20, 10, 5)},
}
COLUMNS = ("shape_ranked", "shape_random", "shape_oracle", "shape_average", "shape_mean_face", "shape_diversity",
           "exp_first", "exp_oracle", "exp_average", "exp_neutral", "exp_diversity")
COMPARED = {"shape_ranked": "shape: IdRank pick", "exp_first": "expr.: first sample",
            "exp_random": "expr.: mean over M samples"}


def data_overrides(data: Path) -> list[str]:
    """Config overrides that read the synthetic FLAME assets and data set under `data`."""
    flame = data / "flame"
    return [f"model.flame_model_path={flame / 'generic_model.pkl'}",
            f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
            f"model.front_indices_path={flame / 'frontindices.npy'}", f"dataset.root={data}"]


def held_out_frames(count: int, data: Path) -> dict[str, torch.Tensor]:
    """The first `count` SYNTHVAL frames with their ground-truth FLAME parameters."""
    cfg = load_config(REPO / "configs" / "demo" / "expgen.yml",
                      ["dataset.occlusion.enabled=false", *data_overrides(data)])
    data = ExpressionDataset(cfg.dataset, ["SYNTHVAL"], n_exp=50, split="val", seed=0)
    items = [data[i] for i in range(min(count, len(data)))]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "arcface", "shape", "expression", "jaw")}


@torch.no_grad()
def evaluate(pipe: OferPipeline, truth_flame: FLAME, frames: dict[str, torch.Tensor], seed: int) -> dict[str, np.ndarray]:
    """Metrics per frame (arrays over the frames); `truth_flame` takes the full ground-truth shape vector."""
    flame = truth_flame
    recs = pipe(frames["image"][:, 0], frames["arcface"][:, 0], torch.Generator().manual_seed(seed))
    rows = []
    for i, rec in enumerate(recs):
        shape = frames["shape"][i : i + 1]
        neutral_gt = flame(shape)[0].numpy() * 1000.0
        expr_gt = flame(shape, expression=frames["expression"][i : i + 1], jaw=frames["jaw"][i : i + 1])[0].numpy() * 1000.0
        samples = pipe.flame(torch.from_numpy(rec.shapes)).numpy() * 1000.0  # (N, V, 3)
        shape_err = vertex_errors(samples, neutral_gt).mean(1)  # (N,)
        mean_face = flame(torch.zeros_like(shape))[0].numpy() * 1000.0
        m = len(rec.expressions)
        expressions = torch.from_numpy(rec.expressions)  # (M, n_exp), padded with zeros to the truth's 50
        expressions = torch.nn.functional.pad(expressions, (0, flame.n_exp - expressions.shape[1]))
        jaws = jaws_to_pose(torch.from_numpy(rec.jaws), pipe.test.jaw_limits)  # as the pipeline posed them
        exp_meshes = flame(shape.expand(m, -1), expression=expressions,
                           jaw=pipe.jaw_scale * jaws).numpy() * 1000.0  # (M, V, 3)
        exp_err = vertex_errors(exp_meshes, expr_gt).mean(1)  # (M,)
        rows.append({
            "shape_ranked": shape_err[rec.best], "shape_random": shape_err.mean(), "shape_oracle": shape_err.min(),
            "shape_average": vertex_errors(samples.mean(0), neutral_gt).mean(),
            "shape_mean_face": vertex_errors(mean_face, neutral_gt).mean(), "shape_diversity": diversity(samples).mean(),
            "exp_first": exp_err[0], "exp_random": exp_err.mean(), "exp_oracle": exp_err.min(),
            "exp_average": vertex_errors(exp_meshes.mean(0), expr_gt).mean(),
            "exp_neutral": vertex_errors(neutral_gt, expr_gt).mean(), "exp_diversity": diversity(exp_meshes).mean(),
        })
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def print_comparison(results: dict[str, dict[str, np.ndarray]]) -> None:
    """Relative change of the compared errors against the first setting, ± s.e. of the paired difference."""
    reference, *others = results
    print(f"\nchange against {reference} (paired over the frames, ± one standard error):\n")
    print("| sampler | " + " | ".join(COMPARED.values()) + " |")
    print("|---" * (len(COMPARED) + 1) + "|")
    for label in others:
        cells = []
        for key in COMPARED:
            ref, diff = results[reference][key], results[label][key] - results[reference][key]
            se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            cells.append(f"{100 * diff.mean() / ref.mean():+.1f} % ± {100 * se / ref.mean():.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def stage_checkpoint(folder: Path, stage: str) -> Path:
    """`<folder>/<stage>.tar` (bundled models) or `<folder>/<stage>/last.tar` (a training run)."""
    bundled = folder / f"{stage}.tar"
    return bundled if bundled.is_file() else folder / stage / "last.tar"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--num-shapes", type=int, default=32)
    p.add_argument("--num-expressions", type=int, default=16)
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="runs per frame and setting, metrics averaged over them")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="test.dtype: networks in float32 or under bfloat16 autocast")
    p.add_argument("--checkpoints", type=Path, default=REPO / "models" / "demo",
                   help="the bundled models (idgen.tar, expgen.tar, idrank.tar) or a training run's folder "
                        "(idgen/, expgen/, idrank/ last.tar, e.g. checkpoint/demo)")
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic",
                   help="the synthetic data set (with its flame/ assets)")
    args = p.parse_args()
    paths = {stage: stage_checkpoint(args.checkpoints, stage) for stage in ("idgen", "expgen", "idrank")}
    for stage, path in paths.items():
        ckpt = read_checkpoint(path)
        print(f"{stage}: {ckpt['step']} steps, trained for {ckpt.get('train_seconds', float('nan')) / 60:.1f} min")
    cfg = load_config(REPO / "configs" / "demo" / "test.yml",
                      [f"test.numsamples={args.num_shapes}", f"test.num_expressions={args.num_expressions}",
                       f"test.dtype={args.dtype}",
                       *[o for o in data_overrides(args.data) if o.startswith("model.")]])
    pipe = OferPipeline.from_checkpoints(cfg, paths["idrank"], paths["idgen"], paths["expgen"], torch.device("cpu"))
    try:
        frames = held_out_frames(args.images, args.data)
    except InputError as err:  # e.g. only demo.py's test set there
        raise SystemExit(f"{err}: this needs the full synthetic data set with its SYNTHVAL actors "
                         "(python -m ofer.data.synthetic --out data/synthetic, or --data)") from None
    truth_flame = FLAME(cfg.model.flame_model_path, n_shape=frames["shape"].shape[1], n_exp=50)
    print(f"\n{len(frames['image'])} held-out frames, N={args.num_shapes} shapes, M={args.num_expressions} expressions, "
          f"{args.seeds} run(s) per frame, errors and diversity in mm\n")
    print("| sampler | " + " | ".join(COLUMNS) + " | s/image |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    results = {}
    for label in args.settings:
        sampler, steps = SETTINGS[label]
        pipe.test.sampling, pipe.test.steps, pipe.test.exp_sampling, pipe.test.exp_steps = sampler, steps, sampler, steps
        start = time.perf_counter()
        runs = [evaluate(pipe, truth_flame, frames, args.seed + r) for r in range(args.seeds)]
        results[label] = {k: np.mean([run[k] for run in runs], axis=0) for k in runs[0]}  # per frame
        seconds = time.perf_counter() - start
        print(f"| {label} | " + " | ".join(f"{results[label][k].mean():.2f}" for k in COLUMNS)
              + f" | {seconds / (len(frames['image']) * args.seeds):.2f} |", flush=True)
    if len(results) > 1:
        print_comparison(results)


if __name__ == "__main__":
    main()
