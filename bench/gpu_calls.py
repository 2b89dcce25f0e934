"""One denoiser call on a GPU: milliseconds per call and max |difference| against the CPU.

For IdGen Denoiser(300, 512, [300, 50, 10]) and ExpGen Denoiser(53, 1024, [53, 25, 10]) with
random weights at ``--rows`` rows (100: one image's samples) and step 500 it prints, per
network, one row per way of calling it:

- ``eager``: the fast path as sampling calls it (``at_step``, the run's steps prepared);
- ``eager, step read back``: the same through ``__call__`` with a (B,) tensor of steps, which
  reads the step back to the host every call (what the samplers did before ``at_step``);
- ``CUDA graph``: ``StaticEps`` replaying the captured step (its capture time printed too);
- ``bf16 eager`` and ``bf16 CUDA graph``: the same in bfloat16;

each timed as a chain of ``--calls`` calls (each takes the last one's output, as in sampling),
best of 3, with the max |ε̂ − ε̂ on the CPU in float32| on the same weights and inputs, and
the operators one call runs (counted by a dispatch mode; about the kernels it launches).
Before timing, the captured step and a ``dpmpp_2m`` sampling loop run under ``DeviceCheck``
on the GPU itself. Rows are printed as they come; ``--json`` appends one JSON line per row.

    python bench/gpu_calls.py --device cuda --json OUT/calls.jsonl
    python bench/gpu_calls.py --device cpu --calls 5     # a dry run of the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ofer.diffusion import Denoiser, NoiseSchedule, sample
from ofer.diffusion.denoiser import StaticEps
from ofer.diffusion.device_check import DeviceCheck, DeviceCheckError
from ofer.diffusion.noise import seeded_generator

CONFIGS = {"IdGen": (300, 512, [300, 50, 10]), "ExpGen": (53, 1024, [53, 25, 10])}
STEP = 500


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chain_ms(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int, device: torch.device) -> float:
    """Best of 3 mean ms per call over a chain of ``calls`` calls, the device's queue included."""
    call(x)  # warm-up
    best = float("inf")
    for _ in range(3):
        y = x
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            y = y - 1e-3 * call(y)
        sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 1000 * best


def ops_per_call(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    with OpCount() as counter:
        call(x)
    return counter.count


def device_check(net: Denoiser, context: torch.Tensor, rows: int, dtype: torch.dtype) -> str:
    """'ok', or the first host sync / foreign tensor in the captured step or a sampling loop."""
    device = context.device
    fast = net.sampler(context, dtype)
    static = StaticEps(fast.eps, (rows, net.flame_dim), device)  # eager on the static buffers
    x, schedule = torch.randn(rows, net.flame_dim, device=device), NoiseSchedule().to(device)
    try:
        with DeviceCheck(device):
            static.at_step(x, STEP)
        with DeviceCheck(device, strict=False):
            sample(static, schedule, (rows, net.flame_dim), "dpmpp_2m", 10, generator=seeded_generator(0),
                   device=device)
    except DeviceCheckError as err:
        return f"FAIL: {err}"
    return "ok"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--calls", type=int, default=200, help="calls per timed chain")
    p.add_argument("--json", help="append one JSON line per row to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)  # wants an index
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (a dry run: no graphs)"
    print(f"torch {torch.__version__}, {machine}, {args.rows} rows, step {STEP}, "
          f"chains of {args.calls} calls, best of 3", flush=True)
    print("\n| network | call | ms per call | vs eager | operators per call | max abs diff vs CPU float32 |"
          "\n|---|---|---|---|---|---|", flush=True)
    for name, (flame_dim, context_dim, dims) in CONFIGS.items():
        torch.manual_seed(0)
        net_cpu = Denoiser(flame_dim, context_dim, dims).eval()
        gen = torch.Generator().manual_seed(1)
        x_cpu = torch.randn(args.rows, flame_dim, generator=gen)
        ctx_cpu = torch.randn(args.rows, context_dim, generator=gen)
        with torch.no_grad():
            reference = net_cpu.sampler(ctx_cpu, timesteps=[STEP]).at_step(x_cpu, STEP)  # (rows, D)
        net = net_cpu.to(device)
        x, ctx = x_cpu.to(device), ctx_cpu.to(device)
        t = torch.full((args.rows,), STEP, device=device)
        for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else ():  # on a CPU all is the host
            print(f"device check, {name} {str(dtype)[6:]}: {device_check(net, ctx, args.rows, dtype)}", flush=True)
        rows: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], float]] = []
        for dtype, label in ((torch.float32, ""), (torch.bfloat16, "bf16 ")):
            fast = net.sampler(ctx, dtype, timesteps=[STEP])
            rows.append((f"{label}eager", lambda y, fast=fast: fast.at_step(y, STEP), 0.0))
            if not label:
                rows.append(("eager, step read back", lambda y, fast=fast, t=t: fast(y, t), 0.0))
            static = StaticEps(net.sampler(ctx, dtype).eps, (args.rows, flame_dim), device, cuda_graph=True)
            rows.append((f"{label}CUDA graph", lambda y, static=static: static.at_step(y, STEP), static.capture_seconds))
        eager_ms = None
        for label, call, capture in rows:
            ms = chain_ms(call, x, args.calls, device)
            eager_ms = eager_ms or ms
            diff = (call(x).cpu() - reference).abs().max().item()
            ops = ops_per_call(call, x)
            extra = f" (capture {capture:.2f} s)" if capture else ""
            print(f"| {name} | {label}{extra} | {ms:.3f} | {eager_ms / ms:.1f}x | {ops} | {diff:.1e} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"network": name, "call": label, "ms": round(ms, 4), "speedup": eager_ms / ms,
                                        "ops": ops, "max_abs_diff": diff, "capture_s": round(capture, 3)}) + "\n")
    if device.type == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
