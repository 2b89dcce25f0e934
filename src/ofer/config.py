"""Typed configuration: dataclass schema, YAML loading, dotted overrides, validation.

A stage config is a YAML file whose sections mirror the dataclasses below. Loading checks
every key against the schema (an unknown key is an error naming the key and the closest
valid one), every value against its declared type and numeric values against their `Range`
(``Annotated[int, Range(low=1)]``), then the rules that tie keys together
(`_check_consistency`, e.g. ``net.dims[0] == net.flame_dim``). Command-line overrides use dotted
paths: ``--opt train.diff_lr=1e-4 --opt dataset.training_data=[LYHM,FLORENCE]``.

Key names follow the original OFER/MICA configs where the method defines them
(``n_shape``, ``flame_dim``, ``context_dim``, ``dims``, ``numqkv``, ``varsched.num_steps``,
``beta_1``, ``beta_T``, ``expencoder``, ``with_freeze``, ``numsamples``, ``sampling``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from ofer.io import short_repr


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class RangeError(ConfigError):
    """A numeric config value of the right type lies outside its allowed range."""


class NonEmpty:
    """Marks a list config value that must hold at least one item: ``Annotated[list[str], NonEmpty()]``."""


@dataclass(frozen=True)
class Range:
    """The interval a numeric config value must lie in (a bound of None is open-ended).

    Used as ``Annotated[int, Range(low=1)]``; `low_open`/`high_open` exclude the bound itself.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):  # nan/inf (YAML .nan, .inf) are in no range
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Count = Annotated[int, Range(low=1)]  # sizes, step counts, intervals
NonNegative = Annotated[int, Range(low=0)]  # counts that may be 0, seeds (numpy needs them >= 0)
Positive = Annotated[float, Range(low=0, low_open=True)]  # learning rates, clip norms
Probability = Annotated[float, Range(low=0, high=1)]
Beta = Annotated[float, Range(low=0, high=1, low_open=True, high_open=True)]


# ----------------------------------------------------------------------------- schema


SamplerName = Literal["ddpm", "ddim", "ddim_legacy", "dpmpp_2m", "unipc"]  # ofer.diffusion.samplers.SAMPLERS
OccluderKind = Literal["rectangle", "ellipse", "hand", "texture"]  # ofer.data.occlusion.KINDS


@dataclass
class NetConfig:
    """The denoiser (IdGen/ExpGen) or ranker (IdRank) network."""

    flame_dim: Count = 300  # D: 300 shape (IdGen) or 50 expression + 3 jaw (ExpGen)
    context_dim: Count = 512  # C: 512 ArcFace (IdGen), 1024 FaRL+ArcFace (ExpGen, IdRank)
    dims: list[Count] = field(default_factory=lambda: [300, 50, 10])
    hidden_dims: list[Count] = field(default_factory=lambda: [4096, 1024, 256, 64])  # IdRank widths (original)
    numqkv: Count = 16
    losstype: Literal["l1", "mse"] = "l1"


@dataclass
class VarSchedConfig:
    """Linear beta schedule of the diffusion models (SPEC §5)."""

    num_steps: Annotated[int, Range(low=2)] = 1000
    beta_1: Beta = 1e-4
    beta_T: Beta = 1e-2


@dataclass
class ModelConfig:
    """FLAME assets and image encoders shared by all stages."""

    flame_model_path: str = "pretrained/FLAME2020/generic_model.pkl"
    flame_lmk_embedding_path: str = "pretrained/FLAME2020/landmark_embedding.npy"
    front_indices_path: str = "checkpoint/frontindices.npy"
    n_shape: Annotated[int, Range(low=1, high=300)] = 300  # FLAME files hold 300 identity columns
    n_exp: NonNegative = 50
    expencoder: Literal["arcface", "farl", "arcfarl"] = "arcface"
    tiny_encoders: bool = False  # small CPU encoders with the same output sizes
    arcface_weights: Optional[str] = "pretrained/arcface/backbone.pth"
    farl_weights: Optional[str] = "pretrained/FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    with_freeze: Literal["l4", "l3", "l2", "none"] = "l4"
    jaw_scale: Annotated[float, Range(low=0)] = 0.5  # ExpGen: sampled jaw pose is scaled before FLAME (original: 0.5)


@dataclass
class OcclusionConfig:
    """Our occlusion augmentation (the original has none; SPEC §8)."""

    enabled: bool = False
    prob: Probability = 0.5
    min_area: Annotated[float, Range(low=0, high=0.5, low_open=True)] = 0.05
    max_area: Annotated[float, Range(low=0, high=0.5, low_open=True)] = 0.35
    kinds: Annotated[list[OccluderKind], NonEmpty()] = field(default_factory=lambda: ["rectangle", "ellipse", "hand", "texture"])


@dataclass
class DatasetConfig:
    """Training data in the MICA/OFER on-disk layout (SPEC §8)."""

    root: str = "data"
    training_data: list[str] = field(default_factory=list)
    validation_data: list[str] = field(default_factory=list)
    list_dir: str = "image_paths"
    params_dir: str = "FLAME_parameters"  # FLAME23_parameters for the OFER layout
    n_images: Count = 4  # images drawn per actor (with replacement)
    batch_size: Count = 8  # actors per batch
    num_workers: NonNegative = 2
    on_bad_sample: Literal["raise", "skip"] = "raise"
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)


@dataclass
class IdRankTrainConfig:
    """IdRank training: the frozen IdGen that proposes shapes."""

    idgen_checkpoint: str = "checkpoint/model_idgen_flame20.tar"
    idgen_config: str = "configs/idgen_flame20.yml"  # used when the checkpoint carries no config
    numsamples: Annotated[int, Range(low=2)] = 100  # ListNet needs at least 2 samples to rank
    sampling: SamplerName = "ddpm"
    steps: Optional[Count] = None


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    diff_lr: Positive = 1e-4
    arcface_lr: Positive = 1e-5
    farl_lr: Positive = 1e-5
    rank_lr: Positive = 1e-6
    weight_decay: Annotated[float, Range(low=0)] = 0.0
    max_steps: Count = 100000
    log_steps: Count = 50
    val_steps: Count = 1000
    checkpoint_steps: Count = 1000
    val_batches: Count = 4
    grad_clip: Optional[Positive] = None
    ema_decay: Optional[Annotated[float, Range(low=0, high=1, high_open=True)]] = None
    amp: bool = True  # mixed precision, used only on CUDA
    lr_patience: NonNegative = 10  # ReduceLROnPlateau, counted in validations
    lr_factor: Annotated[float, Range(low=0, high=1, low_open=True, high_open=True)] = 0.5
    seed: NonNegative = 0
    output_dir: str = "output/run"
    device: str = "auto"
    # Start from the weights of this file (a released OFER checkpoint, a bundle, a demo model, or
    # a last.tar/best.tar of ours) with a fresh optimiser: fine-tuning. Ignored by --resume.
    init_checkpoint: Optional[str] = None


@dataclass
class TestConfig:
    """Sampling at test time (SPEC §7, §11)."""

    numsamples: Count = 100  # N shape samples for IdRank
    num_expressions: Count = 100  # M expression samples
    num_saved_expressions: NonNegative = 15
    sampling: SamplerName = "ddim_legacy"  # IdGen
    steps: Optional[Count] = None
    eta: Probability = 0.0
    exp_sampling: SamplerName = "ddpm"  # ExpGen
    exp_steps: Optional[Count] = None
    # Clamp sampled jaw poses (radians, before model.jaw_scale) per axis into
    # [x_lo, x_hi, y_lo, y_hi, z_lo, z_hi] (ofer.flame.jaw); null: as the original, no clamp.
    jaw_limits: Optional[list[float]] = None
    seed: NonNegative = 0
    # ArcFace's final BN1d where the original encodes one image alone (IdRank's context): "skip"
    # as the original's forward does on a batch of one, "apply" as in training, "auto" = "skip"
    # for original checkpoints and "apply" for ours (see ofer.encoders.arcface).
    arcface_single_image_bn: Literal["auto", "skip", "apply"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"  # networks at inference (bfloat16: autocast)
    cuda_graph: bool = False  # on CUDA, replay each denoiser call as a captured CUDA graph
    compile: bool = False  # torch.compile the denoiser call (compiles once per process; README "Speed")
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
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` (and its Range) and return it (ints are accepted where floats are)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _coerce(value, base, where)
        for bound in extras:
            if isinstance(bound, Range) and value not in bound:
                raise RangeError(f"config key '{where}': {short_repr(value)} is out of range; allowed: {bound}")
            if isinstance(bound, NonEmpty) and not value:
                raise ConfigError(f"config key '{where}': must not be empty")
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except RangeError:
                raise  # the type fits this option: report the range, not the type
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
    raise ConfigError(f"config key '{where}': expected {_type_name(tp)}, got {short_repr(value)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a (partial) dict, validating keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            shown = key if isinstance(key, str) else short_repr(key)
            close = difflib.get_close_matches(str(shown), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{shown}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that single-key ranges cannot express."""
    net, model = cfg.net, cfg.model
    if len(net.dims) < 2 or net.dims[0] != net.flame_dim:
        raise ConfigError(f"config key 'net.dims': {short_repr(net.dims)} must have at least 2 entries and start with "
                          f"net.flame_dim ({net.flame_dim})")
    if cfg.stage == "idgen" and net.flame_dim != model.n_shape:
        raise ConfigError(f"config key 'net.flame_dim': {net.flame_dim} must equal model.n_shape ({model.n_shape}) "
                          "for IdGen, which diffuses the shape coefficients")
    if cfg.stage == "expgen" and net.flame_dim != model.n_exp + 3:
        raise ConfigError(f"config key 'net.flame_dim': {net.flame_dim} must equal model.n_exp + 3 "
                          f"({model.n_exp + 3}) for ExpGen, which diffuses expression and jaw coefficients")
    if cfg.varsched.beta_1 > cfg.varsched.beta_T:
        raise ConfigError(f"config key 'varsched.beta_1': {cfg.varsched.beta_1!r} must not exceed "
                          f"varsched.beta_T ({cfg.varsched.beta_T!r})")
    occlusion = cfg.dataset.occlusion
    if occlusion.min_area > occlusion.max_area:
        raise ConfigError(f"config key 'dataset.occlusion.min_area': {occlusion.min_area!r} must not exceed "
                          f"dataset.occlusion.max_area ({occlusion.max_area!r})")


MAX_CONFIG_VALUES = 10_000  # a whole config holds ~100 values; YAML aliases or a pickle's shared references can repeat far more


def _check_size(data: Any) -> None:
    """Refuse config data of more than MAX_CONFIG_VALUES values (counted with repeats, so a
    structure shared many times, an alias bomb, counts as big as it would print), naming the key."""
    count, stack = 0, [("", data)]
    while stack:
        where, node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"config key '{where or '<root>'}': more than {MAX_CONFIG_VALUES} values (YAML aliases or "
                              "shared references repeating a structure?); a config holds single values and short lists")
        if isinstance(node, dict):
            for key, value in node.items():
                name = key if isinstance(key, str) else short_repr(key)
                stack.append((f"{where}.{name}" if where else name, value))
        elif isinstance(node, (list, tuple)):
            stack.extend((where, v) for v in node)


def _build_config(data: dict) -> Config:
    _check_size(data)
    cfg = _build(Config, data, "")
    _check_consistency(cfg)
    return cfg


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """`update` over `base`, section by section; keys cannot be set under a value that is not a section."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value, f"{prefix}{key}.")
        elif isinstance(value, dict) and old is not None:
            raise ConfigError(f"'{prefix}{key}' is {short_repr(old)}, not a section, so it has no keys to set")
        else:
            out[key] = value
    return out


def _schema_type(keys: list[str]) -> Any:
    """The declared type at a dotted key path of `Config`, or None for a key it does not have."""
    tp: Any = Config
    for key in keys:
        if not dataclasses.is_dataclass(tp) or key not in (hints := typing.get_type_hints(tp, include_extras=True)):
            return None
        tp = hints[key]
    return tp


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where (line, column)."""
    if isinstance(err, yaml.reader.ReaderError):  # undecodable bytes, or a control character
        what = (f"the text is not {err.encoding.upper()} (byte {err.character:#04x}" if err.encoding
                else f"unacceptable character #x{err.character:04x} (")
        return f"{what} at byte {err.position}: {err.reason})"
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{'a': {'b': {'c': value}}}``; the value is read as YAML (safe_load).

    Errors start with ``override '<text>':``. A section (``test``, ``dataset.occlusion``) can be
    given only as a mapping: ``test=5`` would drop all of the file's ``test:`` keys.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: the key '{path.strip()}' has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:  # malformed, an undefined alias, an unknown or bad tag (!!python/..., !!binary)
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
    section = _schema_type(keys)
    if dataclasses.is_dataclass(section) and not isinstance(value, dict):
        first = dataclasses.fields(section)[0].name
        raise ConfigError(f"override {text!r}: '{path.strip()}' is a config section, not a value; set its keys, "
                          f"e.g. {path.strip()}.{first}=...")
    out: dict = {}
    node = out
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
            loaded = yaml.safe_load(path.read_bytes())  # bytes: PyYAML checks the encoding (UTF-8/16) itself
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        data = loaded or {}
    where = "" if path is None else f"{path}, "
    for text in overrides or []:
        try:
            data = _merge(data, parse_override(text))
        except ConfigError as err:
            message = str(err)
            raise ConfigError(f"{where}{message if message.startswith('override ') else f'override {text!r}: {message}'}"
                              ) from None
    try:
        return _build_config(data)
    except ConfigError as err:
        if path is None:
            raise
        # Name the override that set the key the error is about (the last one wins), besides the file.
        culprit = next((text for text in reversed(overrides or []) if f"'{text.split('=', 1)[0].strip()}'" in str(err)),
                       None)
        raise ConfigError(f"{path}{'' if culprit is None else f', override {culprit!r}'}: {err}") from None


def override_config(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotted overrides applied (as `load_config`'s), validated again."""
    data = config_to_dict(cfg)
    for text in overrides:
        data = _merge(data, parse_override(text))
    return _build_config(data)


def config_from_dict(data: dict) -> Config:
    """Validate a plain dict (e.g. the config saved in a checkpoint) into a Config."""
    return _build_config(data)


def config_to_dict(cfg: Any) -> dict:
    """Plain-dict view of a config (for saving beside checkpoints and logs)."""
    return dataclasses.asdict(cfg)
