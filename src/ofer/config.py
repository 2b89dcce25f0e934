"""Typed configuration: dataclass schema, YAML loading, dotted overrides, validation.

A stage config is a YAML file whose sections mirror the dataclasses below. Loading checks
every key against the schema (an unknown key is an error naming the key and the closest
valid one) and every value against its declared type. Command-line overrides use dotted
paths: ``--opt train.diff_lr=1e-4 --opt dataset.training_data=[LYHM,FLORENCE]``.

Key names follow the original OFER/MICA configs where the method defines them
(``n_shape``, ``flame_dim``, ``context_dim``, ``dims``, ``numqkv``, ``varsched.num_steps``,
``beta_1``, ``beta_T``, ``expencoder``, ``with_freeze``, ``numsamples``, ``sampling``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


# ----------------------------------------------------------------------------- schema


SamplerName = Literal["ddpm", "ddim", "ddim_legacy", "dpmpp_2m", "unipc"]  # ofer.diffusion.samplers.SAMPLERS


@dataclass
class NetConfig:
    """The denoiser (IdGen/ExpGen) or ranker (IdRank) network."""

    flame_dim: int = 300  # D: 300 shape (IdGen) or 50 expression + 3 jaw (ExpGen)
    context_dim: int = 512  # C: 512 ArcFace (IdGen), 1024 FaRL+ArcFace (ExpGen, IdRank)
    dims: list[int] = field(default_factory=lambda: [300, 50, 10])
    numqkv: int = 16
    losstype: Literal["l1", "mse"] = "l1"


@dataclass
class VarSchedConfig:
    """Linear beta schedule of the diffusion models (SPEC §5)."""

    num_steps: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 1e-2


@dataclass
class ModelConfig:
    """FLAME assets and image encoders shared by all stages."""

    flame_model_path: str = "pretrained/FLAME2020/generic_model.pkl"
    flame_lmk_embedding_path: str = "pretrained/FLAME2020/landmark_embedding.npy"
    front_indices_path: str = "checkpoint/frontindices.npy"
    n_shape: int = 300
    n_exp: int = 50
    expencoder: Literal["arcface", "farl", "arcfarl"] = "arcface"
    tiny_encoders: bool = False  # small CPU encoders with the same output sizes
    arcface_weights: Optional[str] = "pretrained/arcface/backbone.pth"
    farl_weights: Optional[str] = "pretrained/FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    with_freeze: Literal["l4", "l3", "l2", "none"] = "l4"
    jaw_scale: float = 0.5  # ExpGen: sampled jaw pose is scaled before FLAME (original: 0.5)


@dataclass
class OcclusionConfig:
    """Our occlusion augmentation (the original has none; SPEC §8)."""

    enabled: bool = False
    prob: float = 0.5
    min_area: float = 0.05
    max_area: float = 0.35
    kinds: list[str] = field(default_factory=lambda: ["rectangle", "ellipse", "hand", "texture"])


@dataclass
class DatasetConfig:
    """Training data in the MICA/OFER on-disk layout (SPEC §8)."""

    root: str = "data"
    training_data: list[str] = field(default_factory=list)
    validation_data: list[str] = field(default_factory=list)
    list_dir: str = "image_paths"
    params_dir: str = "FLAME_parameters"  # FLAME23_parameters for the OFER layout
    n_images: int = 4  # images drawn per actor (with replacement)
    batch_size: int = 8  # actors per batch
    num_workers: int = 2
    on_bad_sample: Literal["raise", "skip"] = "raise"
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)


@dataclass
class IdRankTrainConfig:
    """IdRank training: the frozen IdGen that proposes shapes."""

    idgen_checkpoint: str = "checkpoint/model_idgen_flame20.tar"
    idgen_config: str = "configs/idgen_flame20.yml"  # used when the checkpoint carries no config
    numsamples: int = 100
    sampling: SamplerName = "ddpm"
    steps: Optional[int] = None


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    diff_lr: float = 1e-4
    arcface_lr: float = 1e-5
    farl_lr: float = 1e-5
    rank_lr: float = 1e-6
    weight_decay: float = 0.0
    max_steps: int = 100000
    log_steps: int = 50
    val_steps: int = 1000
    checkpoint_steps: int = 1000
    val_batches: int = 4
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None
    amp: bool = True  # mixed precision, used only on CUDA
    lr_patience: int = 10  # ReduceLROnPlateau, counted in validations
    lr_factor: float = 0.5
    seed: int = 0
    output_dir: str = "output/run"
    device: str = "auto"


@dataclass
class TestConfig:
    """Sampling at test time (SPEC §7, §11)."""

    numsamples: int = 100  # N shape samples for IdRank
    num_expressions: int = 100  # M expression samples
    num_saved_expressions: int = 15
    sampling: SamplerName = "ddim_legacy"  # IdGen
    steps: Optional[int] = None
    eta: float = 0.0
    exp_sampling: SamplerName = "ddpm"  # ExpGen
    exp_steps: Optional[int] = None
    seed: int = 0
    # Stage configs for checkpoints that carry none (the released original files).
    idgen_config: str = "configs/idgen_flame20.yml"
    expgen_config: str = "configs/expgen_flame20.yml"
    idrank_config: str = "configs/idrank_flame20.yml"


@dataclass
class Config:
    """A whole stage configuration."""

    stage: Literal["idgen", "expgen", "idrank"] = "idgen"
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    net: NetConfig = field(default_factory=NetConfig)
    varsched: VarSchedConfig = field(default_factory=VarSchedConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    idrank: IdRankTrainConfig = field(default_factory=IdRankTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` and return it (ints are accepted where floats are)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    raise ConfigError(f"config key '{where}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a (partial) dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{'a': {'b': {'c': value}}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict = {}
    node = out
    keys = path.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a stage config from YAML (or defaults when `path` is None) plus dotted overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        data = loaded or {}
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    try:
        return _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def config_from_dict(data: dict) -> Config:
    """Validate a plain dict (e.g. the config saved in a checkpoint) into a Config."""
    return _build(Config, data, "")


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (for saving beside checkpoints and logs)."""
    return dataclasses.asdict(cfg)
