"""Speed of the denoiser's stacked attention projection: F.linear (MKL) against oneDNN's product
on a packed weight (``pack_projection`` / ``project``, what the sampler uses on a float32 CPU).

The stacked projection maps a (batch, dim) feature to 4 heads × 3 × 16 tokens × 32 channels =
6144 outputs; dim is each attention's width in IdGen (300, 50, 10) and ExpGen (53, 25, 10).
Both kernels take turns, best of ``--repeats`` rounds of ``--calls`` calls:

    python bench/projection_speed.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from denoiser_speed import best_times  # bench/ is on the path when a bench runs as a script

from ofer.diffusion.denoiser import pack_projection, project

OUTPUTS = 6144
WIDTHS = (10, 25, 50, 53, 300)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"best of {args.repeats} interleaved rounds of {args.calls} calls")
    print("\n| dim | F.linear µs | packed oneDNN µs | ratio | max abs diff |\n|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for dim in WIDTHS:
        weight = torch.randn(OUTPUTS, dim, generator=generator) / dim**0.5
        x = torch.randn(args.batch, dim, generator=generator)
        packed = pack_projection(weight, args.batch)
        if not packed.is_mkldnn:
            raise SystemExit("oneDNN packing is not available in this PyTorch build (or not on this CPU)")
        kernels = {"linear": lambda x=x, w=weight: F.linear(x, w), "packed": lambda x=x, w=packed: project(x, w)}
        times = {name: 1e6 * seconds for name, seconds in best_times(kernels, args.repeats, args.calls).items()}
        diff = (project(x, packed) - F.linear(x, weight)).abs().max().item()
        print(f"| {dim} | {times['linear']:.0f} | {times['packed']:.0f} | "
              f"{times['packed'] / times['linear']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
