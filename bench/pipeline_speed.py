"""Speed of the full OFER pipeline (encoders -> N IdGen shapes -> IdRank -> M ExpGen samples -> FLAME).

Real-size networks with random weights: IdGen (300, 512, [300, 50, 10]), ExpGen (53, 1024,
[53, 25, 10]), IdRank (FLAME-size front region by default), ArcFace IResNet-100 and FaRL
ViT-B/16 (or the tiny encoders with --tiny-encoders). The face model is the synthetic
FLAME-format model (2434 vertices instead of FLAME's 5023; FLAME's cost is small next to
the sampling). Prints seconds per image and images per second per sampler setting (best of
``--repeats`` rounds over the settings), the peak memory, and the time of one IdGen and one
ExpGen network call as sampling makes it (the fast path, ``Denoiser.sampler``, or with
``--cuda-graph`` the replay of the captured step, whose capture time is printed too). It runs with
whichever ``ofer`` is importable, so ``--compare`` can run it on an older checkout too: the
two codes then take turns in fresh processes (each its own peak memory) at the original
samplers, on the device, dtype and CUDA-graph setting given (older code without an option
runs as it is), and the best s/image of each and their ratio are printed.

    python bench/pipeline_speed.py                       # CPU, N=100, M=100, all settings
    python bench/pipeline_speed.py --compare /tmp/ofer-5bf4554 --repeats 2
    python bench/pipeline_speed.py --device cuda --images 8 --cuda-graph --dtype bfloat16
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
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
    ("dpmpp_2m 10", "dpmpp_2m", 10, "dpmpp_2m", 10),
    ("unipc 10", "unipc", 10, "unipc", 10),
    ("dpmpp_2m 5", "dpmpp_2m", 5, "dpmpp_2m", 5),
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
    """Peak GPU memory allocated since the last ``torch.cuda.reset_peak_memory_stats``, or the
    process's peak RSS on a CPU (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def elapsed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_call(fn, device: torch.device, repeats: int = 5) -> float:
    """Best of ``repeats`` timings of one call (after a warm-up)."""
    fn()
    return min(elapsed(fn, device) for _ in range(repeats))


def noise_generator(device: torch.device) -> torch.Generator:
    """Seed 0 as the code samples: a CPU generator where its noise moves to the device
    (``ofer.diffusion.noise.seeded_generator``), else one on the device (older code)."""
    try:
        from ofer.diffusion.noise import seeded_generator
    except ImportError:
        return torch.Generator(device).manual_seed(0)
    return seeded_generator(0)


def network_call(stage, context: torch.Tensor, dtype: torch.dtype, step: int, compiled: bool, cuda_graph: bool):
    """One ε̂ call at ``step`` as sampling makes it, as a function of x, and the seconds a capture
    took: the CUDA-graph step where asked for and the code has one (``static_eps``, replayed),
    else the fast path where the code has one (with the run's steps prepared where it takes them,
    as the eager path of sampling does), else forward. Called with the step as an int where the
    code takes it so (``at_step``), as its samplers do."""
    net = stage.net
    if not hasattr(net, "sampler"):
        t = torch.full((context.shape[0],), step, device=context.device)
        return (lambda x: net(x, t, context)), 0.0
    if cuda_graph and hasattr(stage, "static_eps"):
        start = time.perf_counter()
        static = stage.static_eps(context, dtype)
        return (lambda x: static.at_step(x, step)), time.perf_counter() - start
    if compiled:
        eps = net.sampler(context, dtype, compiled)
    elif "timesteps" in inspect.signature(net.sampler).parameters:
        eps = net.sampler(context, dtype, timesteps=[step])
    else:
        eps = net.sampler(context, dtype)
    if hasattr(eps, "at_step"):
        return (lambda x: eps.at_step(x, step)), 0.0
    t = torch.full((context.shape[0],), step, device=context.device)
    return (lambda x: eps(x, t)), 0.0


def compare(args: argparse.Namespace) -> None:
    """Run this script on today's code and on ``args.compare``'s, in turns, at the original samplers."""
    label = SETTINGS[0][0]
    codes = {"today": REPO / "src", "old": Path(args.compare) / "src"}
    child = [sys.executable, __file__, "--json", "--only", label, "--num-shapes", str(args.num_shapes),
             "--num-expressions", str(args.num_expressions), "--images", str(args.images), "--repeats", "1"]
    child += ["--device", args.device, "--dtype", args.dtype, "--front", str(args.front)]
    # older code without these options runs as it is (float32, eager)
    child += (["--compile"] if args.compile else []) + (["--cuda-graph"] if args.cuda_graph else [])
    child += ["--tiny-encoders"] if args.tiny_encoders else []
    results: dict[str, list[dict]] = {name: [] for name in codes}
    for r in range(args.repeats):
        for name, src in codes.items():
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
            # the child's stderr goes to ours, so that a failing child's traceback reaches the log
            out = subprocess.run(child, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}, {name} ({src}): {results[name][-1]}", flush=True)
    best = {name: min(runs, key=lambda run: run["s_per_image"]) for name, runs in results.items()}
    print(f"\n{label}, N={args.num_shapes}, M={args.num_expressions}, threads {torch.get_num_threads()}, "
          f"best of {args.repeats} turns each:")
    print("\n| code | s per image | one IdGen call ms | one ExpGen call ms | peak memory MB |\n|---|---|---|---|---|")
    for name, run in best.items():
        print(f"| {name} | {run['s_per_image']:.2f} | {run['id_call_ms']:.1f} | {run['exp_call_ms']:.1f} | "
              f"{run['peak_mb']:.0f} |")
    ratio = best["old"]["s_per_image"] / best["today"]["s_per_image"]
    print(f"\nold / today: {ratio:.2f}x s per image")
    if args.json:
        print(json.dumps({"today": best["today"], "old": best["old"], "old_over_today": round(ratio, 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1, help="images reconstructed together in one batch")
    p.add_argument("--num-shapes", type=int, default=100)
    p.add_argument("--num-expressions", type=int, default=100)
    p.add_argument("--front", type=int, default=1785, help="front-face vertices used by IdRank")
    p.add_argument("--tiny-encoders", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="test.dtype")
    p.add_argument("--cuda-graph", action="store_true", help="test.cuda_graph: replay denoiser calls as CUDA graphs")
    p.add_argument("--compile", action="store_true", help="test.compile: torch.compile the denoiser call")
    p.add_argument("--only", nargs="*", help="labels of the settings to run (default: all)")
    p.add_argument("--compare", metavar="OLD_CHECKOUT", help="compare with another checkout (see above)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over the settings, best of them per setting (with --compare: turns of each code)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures (with --compare: both codes')")
    args = p.parse_args()
    if args.compare:
        compare(args)
        return
    device = torch.device(args.device)
    pipe = build(args.tiny_encoders, device, args.num_shapes, args.num_expressions, args.front)
    pipe.test.dtype, pipe.test.cuda_graph, pipe.test.compile = args.dtype, args.cuda_graph, args.compile
    b = args.images
    image, arcface = torch.randn(b, 3, 224, 224), torch.randn(b, 3, 112, 112)
    print(f"device {device}, threads {torch.get_num_threads()}, {b} image(s) per batch, "
          f"N={args.num_shapes}, M={args.num_expressions}, encoders {'tiny' if args.tiny_encoders else 'ArcFace+FaRL'}, "
          f"dtype {args.dtype}{', CUDA graphs' if args.cuda_graph else ''}{', compiled' if args.compile else ''}")

    dtype = getattr(torch, args.dtype)
    with torch.no_grad():
        calls, captures = {}, {}
        for name, stage, rows in (("IdGen", pipe.idgen, b * args.num_shapes),
                                  ("ExpGen", pipe.expgen, b * args.num_expressions)):
            context = torch.randn(rows, stage.net.context_dim, device=device)
            eps, captures[name] = network_call(stage, context, dtype, 500, args.compile, args.cuda_graph)
            x = torch.randn(rows, stage.net.flame_dim, device=device)
            calls[name] = time_call(lambda eps=eps, x=x: eps(x), device)
    how = "eager"
    if args.cuda_graph and hasattr(pipe.idgen, "static_eps"):
        how = "CUDA-graph replay" if device.type == "cuda" else "static buffers"
    print(f"one IdGen call (batch {b * args.num_shapes}, {how}): {1000 * calls['IdGen']:.2f} ms; "
          f"one ExpGen call (batch {b * args.num_expressions}): {1000 * calls['ExpGen']:.2f} ms"
          + (f"; captures {captures['IdGen']:.2f} s and {captures['ExpGen']:.2f} s" if how != "eager" else ""),
          flush=True)

    # Warm-up with 2 steps of each solver the chosen settings use (diffusers' import included);
    # ddim stands for the samplers without a step count (the network path is the same).
    chosen = [row for row in SETTINGS if not args.only or row[0] in args.only]
    for warm in sorted({s if s in ("dpmpp_2m", "unipc") else "ddim" for row in chosen for s in (row[1], row[3])}):
        pipe.test.sampling, pipe.test.steps, pipe.test.exp_sampling, pipe.test.exp_steps = warm, 2, warm, 2
        pipe(image, arcface, noise_generator(device))
    # Rounds over all chosen settings, best per setting: a machine whose speed drifts during
    # the run affects every setting alike instead of the late ones.
    best: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, s_id, n_id, s_exp, n_exp in chosen:
            pipe.test.sampling, pipe.test.steps, pipe.test.exp_sampling, pipe.test.exp_steps = s_id, n_id, s_exp, n_exp
            generator = noise_generator(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = elapsed(lambda generator=generator: pipe(image, arcface, generator), device)
            best[label] = min(best.get(label, float("inf")), seconds)
            peaks[label] = max(peaks.get(label, 0.0), peak_memory_mb(device))
            print(f"  {label}: {seconds / b:.3f} s per image", flush=True)
    memory = "GPU allocated" if device.type == "cuda" else "process RSS, whole run"
    print(f"\n| setting | s per image | images/s | peak memory MB ({memory}) |\n|---|---|---|---|")
    for label, seconds in best.items():
        print(f"| {label} | {seconds / b:.3f} | {b / seconds:.2f} | {peaks[label]:.0f} |")
    if args.json:
        print(json.dumps({"s_per_image": round(seconds / b, 4), "id_call_ms": round(1000 * calls["IdGen"], 3),
                          "exp_call_ms": round(1000 * calls["ExpGen"], 3), "peak_mb": round(peaks[label]),
                          "settings": {k: round(v / b, 4) for k, v in best.items()}, "images": b,
                          "capture_s": round(captures["IdGen"] + captures["ExpGen"], 3)}))


if __name__ == "__main__":
    main()
