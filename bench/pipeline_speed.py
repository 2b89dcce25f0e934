"""Speed of the full OFER pipeline (encoders -> N IdGen shapes -> IdRank -> M ExpGen samples -> FLAME).

Real-size networks with random weights: IdGen (300, 512, [300, 50, 10]), ExpGen (53, 1024,
[53, 25, 10]), IdRank (FLAME-size front region by default), ArcFace IResNet-100 and FaRL
ViT-B/16 (or the tiny encoders with --tiny-encoders). The face model is the synthetic
FLAME-format model (2434 vertices instead of FLAME's 5023; FLAME's cost is small next to
the sampling). Prints images per second per sampler setting, the peak memory, and the
time of one IdGen and one ExpGen network call.

    python bench/pipeline_speed.py                       # CPU, N=100, M=100, all settings
    python bench/pipeline_speed.py --device cuda --images 8 --compile
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from ofer.config import load_config
from ofer.flame import FLAME
from ofer.flame.synthetic import write_synthetic_flame
from ofer.inference.pipeline import OferPipeline
from ofer.models.stages import DiffusionStage, IdRank

REPO = Path(__file__).resolve().parents[1]
# (label, IdGen sampler, IdGen steps, ExpGen sampler, ExpGen steps)
SETTINGS = [
    ("original: ddim_legacy + ddpm", "ddim_legacy", None, "ddpm", None),
    ("ddpm 1000", "ddpm", None, "ddpm", None),
    ("ddim_legacy (251 calls)", "ddim_legacy", None, "ddim_legacy", None),
    ("ddim 250", "ddim", 250, "ddim", 250),
    ("ddim 50", "ddim", 50, "ddim", 50),
    ("ddim 20", "ddim", 20, "ddim", 20),
    ("ddim 10", "ddim", 10, "ddim", 10),
]


def build(tiny: bool, device: torch.device, n: int, m: int, front: int) -> OferPipeline:
    tmp = Path(tempfile.mkdtemp())
    paths = write_synthetic_flame(tmp)
    enc = [f"model.tiny_encoders={str(tiny).lower()}", "model.arcface_weights=null", "model.farl_weights=null"]
    idgen = DiffusionStage(load_config(REPO / "configs/idgen_flame20.yml", enc), load_weights=False)
    expgen = DiffusionStage(load_config(REPO / "configs/expgen_flame20.yml", enc), load_weights=False)
    idrank = IdRank(load_config(REPO / "configs/idrank_flame20.yml", enc), shape_dim=3 * front, load_weights=False)
    flame = FLAME(paths.model, n_shape=300, n_exp=50, landmark_embedding_path=paths.landmarks)
    front_idx = torch.arange(front) % flame.num_vertices
    test = load_config(None, [f"test.numsamples={n}", f"test.num_expressions={m}"]).test
    return OferPipeline(idgen, idrank, expgen, flame, front_idx, test, 0.5, device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def time_call(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1, help="images reconstructed together in one batch")
    p.add_argument("--num-shapes", type=int, default=100)
    p.add_argument("--num-expressions", type=int, default=100)
    p.add_argument("--front", type=int, default=1785, help="front-face vertices used by IdRank")
    p.add_argument("--tiny-encoders", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the two denoisers")
    p.add_argument("--only", nargs="*", help="labels of the settings to run (default: all)")
    args = p.parse_args()
    device = torch.device(args.device)
    pipe = build(args.tiny_encoders, device, args.num_shapes, args.num_expressions, args.front)
    if args.compile:
        pipe.idgen.net = torch.compile(pipe.idgen.net)
        pipe.expgen.net = torch.compile(pipe.expgen.net)
    b = args.images
    image, arcface = torch.randn(b, 3, 224, 224), torch.randn(b, 3, 112, 112)
    print(f"device {device}, threads {torch.get_num_threads()}, {b} image(s) per batch, "
          f"N={args.num_shapes}, M={args.num_expressions}, encoders {'tiny' if args.tiny_encoders else 'ArcFace+FaRL'}")

    with torch.no_grad():
        ctx_id = torch.randn(b * args.num_shapes, 512, device=device)
        ctx_exp = torch.randn(b * args.num_expressions, 1024, device=device)
        x_id = torch.randn(b * args.num_shapes, 300, device=device)
        x_exp = torch.randn(b * args.num_expressions, 53, device=device)
        t_id = torch.full((len(x_id),), 500, device=device)
        t_exp = torch.full((len(x_exp),), 500, device=device)
        id_call = time_call(lambda: pipe.idgen.net(x_id, t_id, ctx_id))
        exp_call = time_call(lambda: pipe.expgen.net(x_exp, t_exp, ctx_exp))
    print(f"one IdGen call (batch {len(x_id)}): {1000 * id_call:.1f} ms; one ExpGen call (batch {len(x_exp)}): "
          f"{1000 * exp_call:.1f} ms")

    print("\n| setting | s per batch | images/s |\n|---|---|---|")
    for label, s_id, n_id, s_exp, n_exp in SETTINGS:
        if args.only and label not in args.only:
            continue
        pipe.test.sampling, pipe.test.steps, pipe.test.exp_sampling, pipe.test.exp_steps = s_id, n_id, s_exp, n_exp
        generator = torch.Generator(device).manual_seed(0)
        start = time.perf_counter()
        pipe(image, arcface, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"| {label} | {seconds:.2f} | {b / seconds:.3f} |", flush=True)
    print(f"\npeak memory: {peak_memory_mb(device):.0f} MB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")


if __name__ == "__main__":
    main()
