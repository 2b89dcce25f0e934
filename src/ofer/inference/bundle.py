"""Inference-only checkpoint files ("bundles"): what test.py needs from a training checkpoint.

A training checkpoint (`ofer.train.trainer.Trainer.save`) holds the EMA weights under the
module keys, the raw weights beside them (`train_weights`), the optimiser, scheduler and
RNG state. A bundle keeps only the module keys (`net`, `arcface`, `farl`; the noise schedule
`var_sched` is recomputed from the config), the training `config`, `step`, `train_seconds`
and a `bundle` record saying where it came from and how it was made. Floating-point weights
may be stored as float16, half the size; `ofer.checkpoints.load_state` copies them into the
float32 model, so they are float32 again once loaded. test.py reads a bundle like any
checkpoint of ours.

Command (the demo models in models/demo/ were made this way, see the README):

    python -m ofer.inference.bundle --checkpoint checkpoint/demo/idgen/last.tar \
        --out models/demo/idgen.tar --dtype float16 --made-by "python demo.py --train"
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from ofer.checkpoints import FORMAT, read_checkpoint, write_torch_file
from ofer.io import InputError, WriteError

log = logging.getLogger(__name__)

WEIGHT_KEYS = ("net", "arcface", "farl")  # module entries a bundle keeps
KEPT_KEYS = ("config", "step", "train_seconds")  # plain entries a bundle keeps
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors to `dtype` (contiguous copies); integer buffers unchanged."""
    return {k: v.detach().to(dtype).clone() if v.is_floating_point() else v.detach().clone() for k, v in state.items()}


def make_bundle(ckpt: dict[str, Any], dtype: str = "float16", source: str = "", made_by: str = "") -> dict[str, Any]:
    """The inference-only dict of a checkpoint dict (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    bundle: dict[str, Any] = {"format": FORMAT}
    for key in WEIGHT_KEYS:
        if key in ckpt:
            bundle[key] = _cast(ckpt[key], DTYPES[dtype])
    bundle.update({key: ckpt[key] for key in KEPT_KEYS if key in ckpt})
    config = ckpt.get("config") or {}
    bundle["bundle"] = {
        "source": source,
        "made_by": made_by,
        "dtype": dtype,
        "stage": config.get("stage", ""),
        "train_seed": config.get("train", {}).get("seed"),
        "step": ckpt.get("step"),
    }
    return bundle


def write_bundle(checkpoint: str | Path, out: str | Path, dtype: str = "float16", made_by: str = "") -> Path:
    """Read a checkpoint, write its bundle to `out` atomically; return `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.resolve() == out.resolve():
        raise InputError(f"{out}: the bundle must not overwrite its source checkpoint")
    bundle = make_bundle(read_checkpoint(checkpoint), dtype, str(checkpoint), made_by)
    write_torch_file(out, bundle)
    log.info("wrote %s (%.1f MB, %s) from %s", out, out.stat().st_size / 1e6, dtype, checkpoint)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write an inference-only copy of a training checkpoint.")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (e.g. checkpoint/demo/idgen/last.tar)")
    p.add_argument("--out", required=True, help="bundle file to write (e.g. models/demo/idgen.tar)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="storage type of the weights")
    p.add_argument("--made-by", default="", help="how the checkpoint was trained (command, seeds), kept in the file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_bundle(args.checkpoint, args.out, args.dtype, args.made_by)
    except InputError as err:
        log.error("%s", err)
        return 2
    except WriteError as err:  # e.g. a full disk: names the file
        log.error("%s", err)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
