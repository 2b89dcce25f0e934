"""Seconds per image at several batch sizes (images reconstructed together), against batch 1
and ``ofer.inference.batching.auto_batch_size``'s choice, and the peak memory per batch size.

Two sizes:
- ``demo``: the bundled demo models (models/demo/*.tar) with configs/demo/test.yml (N = 32,
  M = 16, ``ddim`` 25 + 25) on the synthetic FLAME-format model (2434 vertices);
- ``flame``: FLAME size, N = M = 100, real-size IdGen/ExpGen/IdRank with random weights and the
  tiny encoders (the encoders run once per image whatever the batch), at ``dpmpp_2m`` 10 and at
  the original samplers (``ddim_legacy`` + ``ddpm``) with ``--original``.

Batch sizes take turns in rounds, best of ``--repeats`` per size. With ``--memory`` each
batch size also runs in a fresh process that prints the memory one call takes beyond what
the process holds before it (``call_memory_mb``: CUDA's peak allocated, or the CPU's peak
RSS), so that the slope over batch sizes gives the memory per image.

    python bench/batch_speed.py --device cpu --sizes demo flame --batches 1 2 4 8 --memory
    python bench/batch_speed.py --device cuda --cuda-graph --batches 1 8 32 auto
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ofer.config import load_config
from ofer.diffusion.noise import seeded_generator
from ofer.flame import FLAME
from ofer.flame.synthetic import write_synthetic_flame
from ofer.inference.batching import auto_batch_size
from ofer.inference.pipeline import OferPipeline
from ofer.models.stages import DiffusionStage, IdRank

REPO = Path(__file__).resolve().parents[1]
FLAME_VERTICES = 5023  # the real FLAME's, for the auto choice at FLAME size (the synthetic model has 2434)


def demo_pipeline(device: torch.device, flame_dir: Path) -> OferPipeline:
    paths = write_synthetic_flame(flame_dir)
    cfg = load_config(REPO / "configs/demo/test.yml", [
        f"model.flame_model_path={paths.model}", f"model.flame_lmk_embedding_path={paths.landmarks}",
        f"model.front_indices_path={paths.front_indices}"])
    demo = REPO / "models/demo"
    return OferPipeline.from_checkpoints(cfg, demo / "idrank.tar", demo / "idgen.tar", demo / "expgen.tar", device)


def flame_pipeline(device: torch.device, flame_dir: Path, original: bool) -> OferPipeline:
    paths = write_synthetic_flame(flame_dir)
    enc = ["model.tiny_encoders=true", "model.arcface_weights=null", "model.farl_weights=null"]
    idgen = DiffusionStage(load_config(REPO / "configs/idgen_flame20.yml", enc), load_weights=False)
    expgen = DiffusionStage(load_config(REPO / "configs/expgen_flame20.yml", enc), load_weights=False)
    idrank = IdRank(load_config(REPO / "configs/idrank_flame20.yml", enc), shape_dim=3 * 1785, load_weights=False)
    flame = FLAME(paths.model, n_shape=300, n_exp=50, landmark_embedding_path=paths.landmarks)
    samplers = (["test.sampling=ddim_legacy", "test.exp_sampling=ddpm"] if original else
                ["test.sampling=dpmpp_2m", "test.steps=10", "test.exp_sampling=dpmpp_2m", "test.exp_steps=10"])
    test = load_config(None, ["test.numsamples=100", "test.num_expressions=100", *samplers]).test
    return OferPipeline(idgen, idrank, expgen, flame, torch.arange(1785) % flame.num_vertices, test, 0.5, device)


def build(size: str, device: torch.device, original: bool, cuda_graph: bool, dtype: str) -> tuple[OferPipeline, int]:
    """The pipeline of ``size`` and the vertex count its auto choice assumes."""
    flame_dir = Path(tempfile.mkdtemp())
    pipe = demo_pipeline(device, flame_dir) if size == "demo" else flame_pipeline(device, flame_dir, original)
    pipe.test.cuda_graph, pipe.test.dtype = cuda_graph, dtype
    return pipe, pipe.flame.num_vertices if size == "demo" else FLAME_VERTICES


def seconds(pipe: OferPipeline, batch: int, device: torch.device) -> float:
    """One pipeline call on ``batch`` random images, the device's queue included."""
    gen = torch.Generator().manual_seed(batch)
    image, arcface = torch.randn(batch, 3, 224, 224, generator=gen), torch.randn(batch, 3, 112, 112, generator=gen)
    generators = [seeded_generator(i) for i in range(batch)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    pipe(image, arcface, generators)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def call_memory_mb(pipe: OferPipeline, batch: int, device: torch.device) -> float:
    """The memory one pipeline call of ``batch`` images takes beyond what is held before it: on
    CUDA the peak allocated less the allocated before; on a CPU the peak RSS (VmHWM, reset
    through /proc/self/clear_refs) less the RSS before, with malloc's mmap threshold fixed
    (MALLOC_MMAP_THRESHOLD_, set by the parent) so that freed tensors leave the RSS."""
    seconds(pipe, batch, device)  # warm-up: caches, static steps
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds(pipe, batch, device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kb("VmRSS")
    seconds(pipe, batch, device)
    return (status_kb("VmHWM") - before) / 1024


def batches_of(args: argparse.Namespace, pipe: OferPipeline, vertices: int, device: torch.device) -> tuple[list[int], int]:
    """The batch sizes to time (1 and the auto choice always among them) and the auto choice."""
    auto = auto_batch_size(device, pipe.test.numsamples, pipe.test.num_expressions, vertices)
    print(f"  auto_batch_size -> {auto}", flush=True)
    return sorted({auto if b == "auto" else int(b) for b in args.batches} | {1, auto}), auto


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", choices=["demo", "flame"], default=["demo", "flame"])
    p.add_argument("--batches", nargs="+", default=["1", "2", "4", "8", "auto"], help="batch sizes, 'auto' included")
    p.add_argument("--original", action="store_true", help="flame size at the original samplers, not dpmpp_2m 10")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="peak memory per batch size, each in a fresh process")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one call at this batch, print the peak
    p.add_argument("--json", help="append one JSON line per size to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.child:
        pipe, _ = build(args.sizes[0], device, args.original, args.cuda_graph, args.dtype)
        print(json.dumps({"batch": args.child, "call_mb": round(call_memory_mb(pipe, args.child, device))}))
        return
    print(f"device {device}, threads {torch.get_num_threads()}, dtype {args.dtype}"
          f"{', CUDA graphs' if args.cuda_graph else ''}, best of {args.repeats} rounds", flush=True)
    for size in args.sizes:
        pipe, vertices = build(size, device, args.original, args.cuda_graph, args.dtype)
        t = pipe.test
        print(f"\n{size}: N={t.numsamples}, M={t.num_expressions}, {t.sampling} {t.steps} + {t.exp_sampling} "
              f"{t.exp_steps}, {pipe.flame.num_vertices} vertices", flush=True)
        batches, auto = batches_of(args, pipe, vertices, device)
        for b in batches:
            seconds(pipe, b, device)  # warm-up (and the static steps of each batch size)
        best = dict.fromkeys(batches, float("inf"))
        for _ in range(args.repeats):
            for b in batches:
                best[b] = min(best[b], seconds(pipe, b, device))
                print(f"  batch {b}: {best[b] / b:.3f} s per image", flush=True)
        peaks = {}
        if args.memory:
            child = [sys.executable, __file__, "--device", args.device, "--sizes", size, "--dtype", args.dtype]
            child += (["--original"] if args.original else []) + (["--cuda-graph"] if args.cuda_graph else [])
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            for b in batches:
                out = subprocess.run([*child, "--child", str(b)], check=True, stdout=subprocess.PIPE, text=True,
                                     env=env).stdout
                peaks[b] = json.loads(out.strip().splitlines()[-1])["call_mb"]
        print(f"\n| {size} batch | s per image | images/s | vs batch 1 | call memory MB |\n|---|---|---|---|---|")
        for b in batches:
            print(f"| {b}{' (auto)' if b == auto else ''} | {best[b] / b:.3f} | {b / best[b]:.2f} | "
                  f"{best[1] / (best[b] / b):.2f}x | {peaks.get(b, '-')} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"size": size, "original": args.original, "auto": auto, "s_per_image": {b: best[b] / b for b in batches},
                                    "call_mb": peaks}) + "\n")


if __name__ == "__main__":
    main()
