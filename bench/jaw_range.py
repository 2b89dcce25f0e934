"""How often ExpGen's jaw samples leave the range of its training data, and what clamping changes.

Samples M expression + jaw vectors per test image with an ExpGen checkpoint (the test
settings of the config), for several seeds, and prints per axis the range of the
training jaws (from the data set's FLAME_parameters), the sampled percentiles, how many
samples leave the limits, and how far the mesh of the mean identity moves (max vertex
distance, mm) when those samples are clamped into them.

    python bench/jaw_range.py --cfg configs/demo/test.yml --checkpoint checkpoint/demo/expgen/last.tar \\
        --data data/synthetic --limits -0.05 0.30 -0.08 0.08 -0.08 0.08
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ofer.checkpoints import checkpoint_config, load_state, read_checkpoint
from ofer.config import load_config
from ofer.flame import FLAME
from ofer.flame.jaw import clamp_jaw, outside_limits
from ofer.inference.pipeline import load_inputs
from ofer.models.stages import DiffusionStage


def training_jaws(data: Path) -> np.ndarray:
    """(K, 3) jaw poses of the training expressions (TEMPEH layout: pose[3:6])."""
    files = sorted((data / "SYNTH" / "FLAME_parameters").glob("*/[0-9]*.npz"))
    if not files:
        raise SystemExit(f"{data / 'SYNTH' / 'FLAME_parameters'}: no training expressions; this needs the full "
                         "synthetic data set (python -m ofer.data.synthetic --out data/synthetic, or demo.py --train)")
    return np.stack([np.load(f)["pose"][3:6] for f in files])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="configs/demo/test.yml")
    p.add_argument("--checkpoint", required=True, help="ExpGen checkpoint")
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--limits", type=float, nargs=6, default=[-0.05, 0.30, -0.08, 0.08, -0.08, 0.08])
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.cfg)
    ckpt = read_checkpoint(args.checkpoint)
    expgen = DiffusionStage(checkpoint_config(ckpt, cfg.test.expgen_config), load_weights=False)
    load_state(ckpt, expgen, args.checkpoint)
    expgen.eval()
    n_exp = expgen.flame_dim - 3
    flame = FLAME(str(args.data / "flame" / "generic_model.pkl"), n_shape=300, n_exp=n_exp,
                  landmark_embedding_path=str(args.data / "flame" / "landmark_embedding.npy"))
    names = (args.data / "test" / "list.txt").read_text().split()
    inputs = [load_inputs(args.data / "test" / f"{n}.jpg") for n in names]
    image, arcface = torch.stack([i for i, _ in inputs]), torch.stack([a for _, a in inputs])
    t = cfg.test
    with torch.no_grad():
        context = expgen.encode(image, arcface)
        samples = torch.cat([
            expgen.sample(context, t.num_expressions, t.exp_sampling, t.exp_steps, t.eta,
                          torch.Generator().manual_seed(seed))
            for seed in range(args.seeds)
        ], dim=1)  # (images, seeds * M, n_exp + 3)
    jaws = samples[..., n_exp:]
    train = training_jaws(args.data)
    out = outside_limits(jaws.numpy(), args.limits)  # (images, seeds * M)
    print(f"{len(names)} test images x {args.seeds} seeds x M={t.num_expressions} ({t.exp_sampling}, "
          f"steps {t.exp_steps}) = {out.size} jaw samples; checkpoint {args.checkpoint}")
    print(f"{'axis':5s} {'train min':>10s} {'train max':>10s} {'limits':>16s} {'sample p1':>10s} {'p50':>8s} "
          f"{'p99':>8s} {'min':>8s} {'max':>8s} {'outside':>8s}")
    flat = jaws.reshape(-1, 3).numpy()
    for k, axis in enumerate("xyz"):
        lo, hi = args.limits[2 * k : 2 * k + 2]
        p1, p50, p99 = np.percentile(flat[:, k], [1, 50, 99])
        n_out = int(((flat[:, k] < lo) | (flat[:, k] > hi)).sum())
        print(f"{axis:5s} {train[:, k].min():10.3f} {train[:, k].max():10.3f} {f'[{lo:.2f}, {hi:.2f}]':>16s} "
              f"{p1:10.3f} {p50:8.3f} {p99:8.3f} {flat[:, k].min():8.3f} {flat[:, k].max():8.3f} {n_out:8d}")
    print(f"samples with any axis outside: {int(out.sum())} of {out.size} ({100 * out.mean():.1f} %); "
          f"images with at least one among the first {t.num_saved_expressions} (saved): "
          f"{int(out[:, : t.num_saved_expressions].any(1).sum())} of {len(names)} (seed 0)")
    if out.any():
        chosen = samples[torch.from_numpy(out)]  # (K, n_exp + 3)
        shape = torch.zeros(len(chosen), 300)
        with torch.no_grad():
            raw = flame(shape, expression=chosen[:, :n_exp], jaw=cfg.model.jaw_scale * chosen[:, n_exp:])
            clamped = flame(shape, expression=chosen[:, :n_exp],
                            jaw=cfg.model.jaw_scale * clamp_jaw(chosen[:, n_exp:], args.limits))
        moved = (raw - clamped).norm(dim=-1).amax(dim=-1) * 1000.0  # (K,) mm
        print(f"clamping them moves the mean-identity mesh by max-vertex {moved.median():.1f} mm (median), "
              f"{moved.max():.1f} mm (max)")


if __name__ == "__main__":
    main()
