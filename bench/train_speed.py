"""Training steps per second of each stage, with the real configs' networks and random data.

Random tensors stand in for the crops and FLAME targets, so only the model's cost is
measured (no data loading). Encoders are the real ArcFace IResNet-100 and FaRL ViT-B/16
with random weights (``--tiny-encoders`` for the small ones); the face model is the synthetic
FLAME-format model. IdRank draws its N IdGen samples with the sampler of its config unless
``--idrank-steps`` picks a DDIM step count.

    python bench/train_speed.py --steps 3 --batch 2
    python bench/train_speed.py --device cuda --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ofer.checkpoints import save_checkpoint
from ofer.config import config_to_dict, load_config
from ofer.flame.synthetic import write_synthetic_flame
from ofer.models.stages import DiffusionStage
from ofer.train.tasks import build_task, param_groups

REPO = Path(__file__).resolve().parents[1]


def configs(tmp: Path, tiny: bool, idrank_samples: int, idrank_steps: int | None) -> dict:
    paths = write_synthetic_flame(tmp / "flame")
    np.save(tmp / "front.npy", np.load(paths.front_indices))
    common = [f"model.flame_model_path={paths.model}", f"model.flame_lmk_embedding_path={paths.landmarks}",
              f"model.front_indices_path={tmp / 'front.npy'}", f"model.tiny_encoders={str(tiny).lower()}",
              "model.arcface_weights=null", "model.farl_weights=null"]
    idgen_cfg = load_config(REPO / "configs/idgen_flame20.yml", common)
    save_checkpoint(tmp / "idgen.tar", DiffusionStage(idgen_cfg, load_weights=False), config=config_to_dict(idgen_cfg))
    rank = [f"idrank.idgen_checkpoint={tmp / 'idgen.tar'}", f"idrank.numsamples={idrank_samples}"]
    if idrank_steps:
        rank += ["idrank.sampling=ddim", f"idrank.steps={idrank_steps}"]
    return {
        "idgen": idgen_cfg,
        "expgen": load_config(REPO / "configs/expgen_flame20.yml", common),
        "idrank": load_config(REPO / "configs/idrank_flame20.yml", common + rank),
    }


def random_batch(b: int, k: int, device: torch.device) -> dict:
    return {
        "image": torch.randn(b, k, 3, 224, 224, device=device),
        "arcface": torch.randn(b, k, 3, 112, 112, device=device),
        "shape": torch.randn(b, 300, device=device),
        "target": torch.randn(b, 53, device=device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2, help="actors per batch (each with n_images=2 images)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tiny-encoders", action="store_true")
    p.add_argument("--idrank-samples", type=int, default=100)
    p.add_argument("--idrank-steps", type=int, default=None, help="DDIM steps for IdRank's IdGen samples")
    p.add_argument("--stages", nargs="*", default=["idgen", "expgen", "idrank"])
    args = p.parse_args()
    device = torch.device(args.device)
    cfgs = configs(Path(tempfile.mkdtemp()), args.tiny_encoders, args.idrank_samples, args.idrank_steps)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch} actors x 2 images\n")
    print("| stage | s/step | steps/s |\n|---|---|---|")
    for stage in args.stages:
        task = build_task(cfgs[stage]).to(device).train()
        optimizer = torch.optim.AdamW(param_groups(task.model, cfgs[stage]))
        data = random_batch(args.batch, 1 if stage == "expgen" else 2, device)

        def step() -> None:
            loss = task(data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        print(f"| {stage} | {seconds:.3f} | {1 / seconds:.2f} |", flush=True)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"\npeak memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
