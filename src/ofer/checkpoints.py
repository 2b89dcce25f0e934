"""One checkpoint loader for the original OFER `.tar` files and ours; atomic saving.

Original files (SPEC §10) are `torch.save` dicts. IdGen/ExpGen: `net` (denoiser),
`diffusion` (the same weights prefixed `net.` plus `var_sched.` buffers), `var_sched`,
`arcface` and, for ExpGen, `farl`; IdRank: `net`, `arcface`, `farl`. Our files use the same
keys (so a stage module's attributes `net`, `var_sched`, `arcface`, `farl` map one to one)
plus `format`, `config`, `step` and, for training, `optimizer`, `scheduler`, `ema` and `rng`.

The original denoiser kept its 16 attention projections in a plain Python list, so its
files never contain them (at most one stray `...fn.fn.qkv.weight`). Loading such a file
drops the stray key and initialises the projections from a fixed seed, with a warning.
Everything is read with ``torch.load(weights_only=True)``: no arbitrary code runs.

`read_checkpoint` also refuses damaged files: a zip-format file (what `torch.save` writes since
torch 1.6) has a CRC-32 per member, and every member is checked before loading (torch's reader
does not check them), which reads the file once more: ~0.25 s per GB from the page cache (CRC-32
at ~4 GB/s on one core), and the disk read a load would do anyway otherwise. Files in the legacy
(pre-1.6, not zip) format carry no checksum. In both, every floating-point tensor must be finite
(~0.5 s per GB), and a config embedded in one of ours must be valid.

Which stage a file holds (`checkpoint_stage`) comes from the config of ours and from the network
shapes of original files, so a file given in the wrong slot is refused (`check_stage`).
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofer.config import Config, ConfigError, config_from_dict, load_config
from ofer.diffusion import is_projection_key
from ofer.encoders.farl import FarlEncoder, load_farl_state_dict
from ofer.io import InputError, atomic_write, short_repr

log = logging.getLogger(__name__)

FORMAT = "ofer-reimpl-1"
PROJECTION_SEED = 0  # seed for the projections absent from original checkpoints
_STRAY_ORIGINAL_KEY = re.compile(r"(^|\.)fn\.fn\.qkv\.weight$")
MODULE_KEYS = ("net", "var_sched", "arcface", "farl")
STAGE_NAMES = {"idgen": "IdGen", "expgen": "ExpGen", "idrank": "IdRank"}
# (flame_dim, context_dim) of the released original denoisers (SPEC §4, §7).
ORIGINAL_DENOISER_SIZES = {(300, 512): "idgen", (53, 1024): "expgen"}


_PART_NAMES = {"net": "network", "arcface": "ArcFace", "farl": "FaRL"}


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict safely (weights_only); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found. The released OFER checkpoints go in checkpoint/ "
            "(see checkpoint/README.md); the bundled demo models are models/demo/*.tar, and "
            "`python demo.py --train` trains its own into checkpoint/demo/."
        )
    _verify_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "net" not in ckpt:
        raise CheckpointError(f"{path}: not an OFER checkpoint (expected a dict with a 'net' entry)")
    _check_finite(ckpt, path)
    if isinstance(ckpt.get("config"), dict):
        try:
            config_from_dict(ckpt["config"])
        except ConfigError as err:
            raise CheckpointError(f"{path}: the config saved in it is invalid: {err}") from None
    return ckpt


_ZIP_MAGIC = b"PK\x03\x04"  # a zip file's first local header; legacy torch files start with a pickle


def _verify_archive(path: Path) -> None:
    """Check the CRC-32 of every member of a zip-format checkpoint; legacy files have none to check."""
    with path.open("rb") as handle:
        if handle.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member; the first whose CRC (or header) is wrong
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint: not a readable zip archive ({err}); copy or download "
                              "it again") from err
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged checkpoint: member '{damaged}' fails its CRC check (changed since "
                              "it was written); copy or download it again")


def _check_finite(ckpt: dict[str, Any], path: Path) -> None:
    """Every floating-point tensor in the checkpoint (weights, optimiser state) must be finite.

    Containers are visited once each, so shared references (a pickle can repeat one list many
    times) cost no more than the file's size.
    """
    stack: list[tuple[str, Any]] = [("", ckpt)]
    seen: set[int] = set()
    while stack:
        where, node = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                name = key if isinstance(key, str) else short_repr(key)
                stack.append((f"{where}.{name}" if where else name, value))
        elif isinstance(node, torch.Tensor) and (node.is_floating_point() or node.is_complex()):
            bad = node.numel() - int(torch.isfinite(node).sum())
            if bad:
                raise CheckpointError(f"{path}: '{where}' holds {bad} NaN or infinite values of {node.numel()} "
                                      "(a damaged file, or one saved after training diverged)")


def is_original(ckpt: dict[str, Any]) -> bool:
    """True for a file written by the original OFER trainer (ours always carry `format`)."""
    return "format" not in ckpt


def checkpoint_stage(ckpt: dict[str, Any]) -> str | None:
    """'idgen', 'expgen' or 'idrank' for the stage a checkpoint holds; None when it cannot be told.

    IdRank nets have `ranklayers`; for the denoisers ours say it in their config (`stage`), and
    original files by their network shapes: IdGen has flame_dim 300 and context 512, ExpGen 53
    and 1024 (context = the conditioning width minus the time embedding's).
    """
    net = ckpt.get("net")
    if not isinstance(net, dict):
        return None
    if any(k.startswith("ranklayers.") for k in net):
        return "idrank"
    config = ckpt.get("config")
    if isinstance(config, dict) and config.get("stage") in STAGE_NAMES:
        return config["stage"]
    try:
        flame_dim = net["init_conv.weight"].shape[0]
        context_dim = net["mid_block1.mlp.1.weight"].shape[1] - net["time_mlp.3.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        return None
    return ORIGINAL_DENOISER_SIZES.get((int(flame_dim), int(context_dim)))


def check_stage(ckpt: dict[str, Any], expected: str, path: str | Path, slot: str) -> None:
    """Refuse a checkpoint that holds another stage than `expected` (e.g. an ExpGen file given as IdGen).

    `slot` names where the file was given (a command-line flag or a config key) for the message.
    A file whose stage cannot be told (`checkpoint_stage` is None) is accepted; loading then checks
    its shapes.
    """
    held = checkpoint_stage(ckpt)
    if held is not None and held != expected:
        source = "its config" if isinstance(ckpt.get("config"), dict) else "its network shapes"
        hint = "check the order of the checkpoint flags" if slot.startswith("--") else f"set {slot} to another file"
        raise CheckpointError(
            f"{path}: given as the {STAGE_NAMES[expected]} checkpoint ({slot}), but it holds an "
            f"{STAGE_NAMES[held]} stage (from {source}); {hint}"
        )


def init_projections(module: nn.Module, keys: list[str], seed: int = PROJECTION_SEED) -> None:
    """Initialise the named projection weights like a default Conv1d, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key in sorted(keys):
            weight = params[key]
            value = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
            weight.copy_(value)


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load `state` into `module`, tolerating only what original files are known to lack.

    Missing attention projections are initialised deterministically (with a warning); any
    other missing or unexpected key, or a shape mismatch, is an error naming the keys.
    """
    state = {k: v for k, v in state.items() if not _STRAY_ORIGINAL_KEY.search(k)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    missing_projections = [k for k in missing if is_projection_key(k)]
    missing_other = [k for k in missing if not is_projection_key(k)]
    if missing_other or unexpected:
        raise CheckpointError(
            f"{path}: '{what}' does not match the model: missing keys {missing_other[:10]}"
            f"{' ...' if len(missing_other) > 10 else ''} ({len(missing_other)} in all), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)"
        )
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: '{what}' has shape mismatches: {'; '.join(wrong[:10])}")
    module.load_state_dict(state, strict=False)
    if missing_projections:
        init_projections(module, missing_projections)
        log.warning(
            "%s: '%s' has no attention projections (an original-format checkpoint); "
            "%d projection weights were initialised from the fixed seed %d",
            path, what, len(missing_projections), PROJECTION_SEED,
        )


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Read an original or our checkpoint and load it into a stage module; return the dict."""
    ckpt = read_checkpoint(path)
    load_state(ckpt, model, path)
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], fallback: str | Path) -> Config:
    """The config a checkpoint of ours was trained with; for original files, the YAML `fallback`."""
    saved = ckpt.get("config")
    if isinstance(saved, dict):
        return config_from_dict(saved)
    log.info("an original-format checkpoint carries no config; its stage is built from %s", fallback)
    return load_config(fallback)


def load_state(ckpt: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Load the entries of a checkpoint dict read from `path` into a stage module.

    Each of `net`, `var_sched`, `arcface`, `farl` that the model has as a submodule is
    loaded from the entry of the same name; a model part without an entry is an error
    (except `var_sched`, whose buffers are recomputed from the config when absent).
    The one log line says where each part's weights came from (file and entry).
    """
    path = Path(path)
    sources = []
    for key in MODULE_KEYS:
        part = getattr(model, key, None)
        if not isinstance(part, nn.Module):
            continue
        if key not in ckpt:
            if key == "var_sched":
                sources.append("noise schedule from the config")
                continue
            raise CheckpointError(f"{path}: the model has '{key}' but the checkpoint has no '{key}' entry")
        if key == "var_sched":
            _check_schedule(part, ckpt[key], path)
            sources.append("noise schedule from the config (checked against 'var_sched')")
            continue
        if isinstance(part, FarlEncoder):
            # An original `farl` entry may hold the whole CLIP model; only the image tower is used.
            load_farl_state_dict(part, ckpt[key], f"{path} ['farl']")
        else:
            load_module_state(part, ckpt[key], key, path)
        sources.append(f"{_PART_NAMES[key]} from '{key}'")
    stage = STAGE_NAMES.get(checkpoint_stage(ckpt) or "", type(model).__name__)
    log.info("%s weights from %s (%s): %s", stage, path,
             "original OFER format" if is_original(ckpt) else ckpt["format"], ", ".join(sources))


def _check_schedule(schedule: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """The schedule comes from the config (varsched.*); warn where the file's buffers differ.

    Buffers are compared by name; the original schedule's extra buffers are ignored.
    """
    own = schedule.state_dict()
    for key, value in state.items():
        if key in own and (value.shape != own[key].shape or not torch.allclose(value.float(), own[key], atol=1e-6)):
            log.warning("%s: var_sched.%s differs from the configured schedule; the config is used", path, key)


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> None:
    """Write the model parts under the original keys, plus `extra` entries, atomically.

    A failed write raises `ofer.io.WriteError` naming `path`; an older file at `path` is kept.
    """
    ckpt: dict[str, Any] = {"format": FORMAT}
    for key in MODULE_KEYS:
        part = getattr(model, key, None)
        if isinstance(part, nn.Module):
            ckpt[key] = {k: v.detach().cpu() for k, v in part.state_dict().items()}
    ckpt.update(extra)
    write_torch_file(path, ckpt)


def write_torch_file(path: str | Path, obj: Any) -> None:
    """`torch.save(obj)` to `path` atomically; a failed write raises `ofer.io.WriteError` naming
    `path` (an older file there is kept)."""
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch reports a failed write (disk full) as "enforce fail at inline_container.cc"
            raise OSError(str(err)) from err
