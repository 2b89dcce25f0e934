"""Speed of one denoiser call, today's code against an older commit, on the same weights and inputs.

For IdGen Denoiser(300, 512, [300, 50, 10]) and ExpGen Denoiser(53, 1024, [53, 25, 10]) at
batch 100 it times, interleaved and best of ``--repeats``:
  - a call inside sampling: today's fast path (``Denoiser.sampler(context, timesteps=[t])``,
    built once per run with the run's steps prepared, as in sampling) against the old
    ``forward`` under no_grad;
  - a training step: forward + backward of a mean-square loss, both in train mode;
and prints the ratios (old time / new time) and the largest |difference| of the outputs and
of the gradients. The old denoiser is loaded from the old checkout's
``src/ofer/diffusion/denoiser.py`` under another module name (it imports only torch):

    git worktree add /tmp/ofer-5bf4554 5bf4554
    python bench/denoiser_speed.py --old /tmp/ofer-5bf4554
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ofer.diffusion import Denoiser

CONFIGS = {"IdGen": (300, 512, [300, 50, 10]), "ExpGen": (53, 1024, [53, 25, 10])}


def load_old_denoiser(checkout: Path):
    """The ``ofer.diffusion.denoiser`` module of another checkout, as module ``ofer_old_denoiser``."""
    path = checkout / "src" / "ofer" / "diffusion" / "denoiser.py"
    spec = importlib.util.spec_from_file_location("ofer_old_denoiser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_times(fns: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Best over ``repeats`` rounds of the mean time of ``calls`` calls; the functions take turns."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def train_step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    out = net(x, t, context)
    out.square().mean().backward()
    return out


def max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    grads = dict(b.named_parameters())
    return max((p.grad - grads[name].grad).abs().max().item() for name, p in a.named_parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, default=Path("/tmp/ofer-5bf4554"), help="checkout of the old commit")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=5, help="calls per timed round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old_module = load_old_denoiser(args.old)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"best of {args.repeats} interleaved rounds of {args.calls} calls; old code: {args.old}")
    print("\n| network | call | old ms | new ms | old/new | max abs diff |\n|---|---|---|---|---|---|")
    for name, sizes in CONFIGS.items():
        compare(name, sizes, old_module, args)


def compare(name: str, sizes: tuple, old_module, args: argparse.Namespace) -> None:
    """Print the sampling-call and training-step rows of one network."""
    flame_dim, context_dim, dims = sizes
    torch.manual_seed(0)
    new = Denoiser(flame_dim, context_dim, dims)
    old = old_module.Denoiser(flame_dim, context_dim, dims)
    old.load_state_dict(new.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, flame_dim, generator=gen)
    context = torch.randn(args.batch, context_dim, generator=gen)
    t = torch.full((args.batch,), 500)

    new.eval(), old.eval()
    with torch.no_grad():
        fast = new.sampler(context, timesteps=t[:1].tolist())  # once per sampling run
        times = best_times({"old": lambda: old(x, t, context), "new": lambda: fast(x, t)}, args.repeats, args.calls)
        diff = (fast(x, t) - old(x, t, context)).abs().max().item()
    print(f"| {name} | sampling (fast path) | {1e3 * times['old']:.2f} | {1e3 * times['new']:.2f} | "
          f"{times['old'] / times['new']:.2f}x | {diff:.1e} |", flush=True)

    new.train(), old.train()
    times = best_times({"old": lambda: train_step(old, x, t, context), "new": lambda: train_step(new, x, t, context)},
                       args.repeats, args.calls)
    diff = (train_step(new, x, t, context) - train_step(old, x, t, context)).abs().max().item()
    print(f"| {name} | training step (fwd+bwd) | {1e3 * times['old']:.2f} | {1e3 * times['new']:.2f} | "
          f"{times['old'] / times['new']:.2f}x | {diff:.1e} (grads {max_grad_diff(new, old):.1e}) |", flush=True)


if __name__ == "__main__":
    main()
