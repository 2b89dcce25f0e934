"""One training loop for IdGen, ExpGen and IdRank (the stage-specific part is a Task).

Reproducibility and resuming: the batch drawn at step s depends only on (seed, step, rank),
item randomness (image choice, occlusion) on (seed, step, index), and the model's own
randomness on the torch RNG, whose state is saved in every checkpoint together with the
training losses since the last validation. A run killed after a checkpoint and resumed with
``--resume`` therefore continues exactly (on CPU), down to which `best.tar` it keeps.

Under torchrun every decision taken from a loss (the LR scheduler step, the best checkpoint)
uses the value averaged over the ranks, so learning rates and weights stay the same on all.

The output folder (`train.output_dir`) is taken by one run (rank 0 holds `.train.lock`, the
lock test.py takes on its own folder, `ofer.lock`) before anything there is touched. A folder
holding an earlier run's `last.tar`/`best.tar` is refused unless `--resume` continues that run
(from its `last.tar`) or `--overwrite` starts a new one there (removing them first).

On `--resume` the config may differ from the one saved in `last.tar` (`RESUME_FIXED`,
`RESUME_APPLIED`): keys of what the saved state is of (the networks, the noise schedule, the
seed the batches are drawn from) are refused; the optimiser's and the LR scheduler's settings
are applied to the resumed state; every other key takes effect where it is read. Each change
is logged.

What a run is can be checked from its folder: at the start rank 0 logs one summary (stage, data,
parameter counts, placement, the resolved config) and writes the config as `config.yaml`
(loadable with `--cfg`); its TensorBoard log (`tb/`) holds the config as text and as hparams,
the first training batch's encoder inputs as the networks see them (augmented), and at each
validation the task's picture of truth vs samples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from ofer.checkpoints import (
    MODULE_KEYS,
    STAGE_NAMES,
    CheckpointError,
    check_stage,
    is_original,
    load_state,
    read_checkpoint,
    save_checkpoint,
)
from ofer.config import Config, ConfigError, config_from_dict, config_to_dict
from ofer.data.datasets import ExpressionDataset, IdentityDataset
from ofer.data.occlusion import input_sheet
from ofer.device import resolve_device
from ofer.encoders.normalise import clip_to_bgr
from ofer.io import (
    InputError,
    OutputFolderError,
    atomic_write,
    check_output_folder,
    remove_stale_temporaries,
    short_repr,
)
from ofer.lock import FolderLock
from ofer.progress import progress
from ofer.train.tasks import METRIC_NOTES, build_task, flatten_images, param_groups

log = logging.getLogger(__name__)

PRIMARY_METRIC = {"idgen": "val/vertex_error_mm", "expgen": "val/vertex_error_mm", "idrank": "val/ranked_error_mm"}
LOCK_NAME = ".train.lock"
CHECKPOINT_NAMES = ("last.tar", "best.tar")
CONFIG_NAME = "config.yaml"  # the resolved config of the run, beside its checkpoints
INPUT_PICTURE_SIZE = 16  # encoder inputs of the first training batch shown in tensorboard
TRAINING_STATE = ("optimizer", "scheduler", "step", "best", "rng")  # what --resume needs beyond the weights
# Config keys (dotted, or a section prefix ending in '.') that --resume cannot change: the saved
# weights and optimiser state are of these networks, and the batches follow the seed.
RESUME_FIXED = ("stage", "model.n_shape", "model.n_exp", "model.expencoder", "model.tiny_encoders", "model.with_freeze",
                "net.", "varsched.", "train.seed")
# Keys held by the resumed optimiser (per parameter group) and LR scheduler: the new value is applied.
RESUME_APPLIED = ("train.diff_lr", "train.arcface_lr", "train.farl_lr", "train.rank_lr", "train.weight_decay",
                  "train.lr_patience", "train.lr_factor")


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for every step from `start_step`, the batch of (step, item index) pairs.

    Items are drawn uniformly (actors are mixed in proportion to their count) from a
    generator seeded by (seed, step, rank), so any step's batch can be recreated.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, max_steps: int, rank: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.max_steps, self.rank = start_step, max_steps, rank

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            rng = np.random.default_rng([self.seed, step, self.rank])
            replace = self.batch_size > self.num_items
            idx = rng.choice(self.num_items, self.batch_size, replace=replace)
            yield [(step, int(i)) for i in idx]


class StepIndexed(Dataset):
    """Adapts a dataset with `set_epoch` so an item is addressed by (step, index)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        step, index = key
        self.dataset.set_epoch(step)
        return self.dataset[index]


def build_dataset(cfg: Config, split: str) -> Any:
    """The identity (IdGen, IdRank) or expression (ExpGen) dataset of a split."""
    names = cfg.dataset.training_data if split == "train" else cfg.dataset.validation_data
    if cfg.stage == "expgen":
        return ExpressionDataset(cfg.dataset, names, n_exp=cfg.model.n_exp, split=split, seed=cfg.train.seed)
    return IdentityDataset(cfg.dataset, names, n_shape=cfg.model.n_shape, split=split, seed=cfg.train.seed)


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as {dotted key: value}."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config_to_dict(cfg), "")
    return flat


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (`dims: [10, 64, 32]`), as the configs in configs/ are written."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def config_yaml(cfg: Config) -> str:
    """The config as YAML, in the schema's key order; `load_config` reads it back to the same config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, width=120)


def hparam_values(cfg: Config) -> dict[str, int | float | str]:
    """The flat config with values tensorboard's hparams show as written: numbers, and the rest as YAML text
    (`true`, `null`, `[10, 64, 32]`; tensorboard would show a bool as 0/1 and drop a None)."""
    return {key: value if isinstance(value, (int, float, str)) and not isinstance(value, bool)
            else yaml.dump(value, Dumper=_ConfigDumper).removesuffix("\n...\n").strip()
            for key, value in flat_config(cfg).items()}


def dataset_size(dataset: Any) -> tuple[int, int]:
    """(actors, images) of an identity or expression dataset (an expression frame is one image)."""
    images = len(dataset) if isinstance(dataset, ExpressionDataset) else sum(len(r.images) for r in dataset.records)
    return len(set(dataset.actors)), images


def input_picture(batch: dict, count: int = INPUT_PICTURE_SIZE) -> np.ndarray:
    """The first `count` encoder inputs of a (CPU) training batch, augmented as trained on: (H, W, 3) BGR.

    Each cell shows the 224 FaRL crop and the 112 ArcFace input of one image, labelled dataset/actor.
    """
    images, arcfaces = flatten_images(batch)  # (B*K, 3, 224, 224), (B*K, 3, 112, 112)
    per_item = batch["image"].shape[1]  # K images of each item
    n = min(count, len(images))
    labels = [f"{batch['dataset'][i // per_item]}/{batch['actor'][i // per_item]}" for i in range(n)]
    return input_sheet([clip_to_bgr(x.numpy()) for x in images[:n]], [a.numpy() for a in arcfaces[:n]], labels)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Distributed:
    """Process placement: one process on CPU/GPU, or one per GPU under torchrun."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(requested: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (one GPU per process, or the CPU);
    pick the device otherwise. A `train.device` that is no device here is a ConfigError."""
    device = resolve_device(requested, "train.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = device.type == "cuda"
        if use_cuda:  # before the process group: NCCL binds each rank to the current device
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        return Distributed(dist.get_rank(), world_size, device)
    return Distributed(0, 1, device)


class Trainer:
    """Builds the task, optimiser, scheduler and data of a stage and runs the loop.

    Rank 0 holds the output folder's lock from here to the end of `fit` (or `close`).
    """

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if not cfg.dataset.training_data:
            raise ConfigError("config key 'dataset.training_data': empty; training needs at least one data set, "
                              "e.g. dataset.training_data=[SYNTH]")
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.place = setup_distributed(cfg.train.device)
        self.lock = FolderLock(self.out, LOCK_NAME, f"train{STAGE_NAMES[cfg.stage]}.py", "set another train.output_dir")
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        self._on_every_rank(lambda: self._prepare_output_dir(resume, overwrite))
        resume_from = self.out / "last.tar" if resume and (self.out / "last.tar").is_file() else None
        if resume and resume_from is None:
            log.info("--resume: no %s yet, starting from scratch", self.out / "last.tar")
        # The files to start from are read and checked before any work.
        state = self._read_training_state(resume_from) if resume_from is not None else None
        init = self._read_initial_weights(Path(cfg.train.init_checkpoint)) if cfg.train.init_checkpoint and not state else None
        torch.manual_seed(cfg.train.seed)
        self.task = build_task(cfg).to(self.place.device)
        if init is not None:  # before the optimiser and the EMA copy are made from the weights
            load_state(init, self.task.model, cfg.train.init_checkpoint)
        self.optimizer = torch.optim.AdamW(param_groups(self.task.model, cfg), weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=cfg.train.lr_factor, patience=cfg.train.lr_patience
        )
        self.ema = (
            AveragedModel(self.task.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
            if cfg.train.ema_decay
            else None
        )
        self.step = 0
        self.saved_step: int | None = None  # the step of the last.tar this run wrote or resumed from
        self.best = math.inf
        self.recent: list[float] = []  # training losses (mean over ranks) since the last validation
        self.seconds = 0.0  # training wall time before this process, kept across resumes
        self.last_picture: np.ndarray | None = None  # rendered validation samples, for tensorboard
        self._metrics_explained = False  # the metric descriptions are logged at the first validation
        self._started = time.perf_counter()
        if state is not None:
            self._resume(*state, resume_from)
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "val") if cfg.dataset.validation_data else None
        self.amp = cfg.train.amp and self.place.device.type == "cuda"
        if self.place.is_main:
            self._write_config()
            log.info("%s", self.summary())

    def parameter_counts(self) -> tuple[int, int]:
        """(trained, frozen) parameter counts: those the optimiser updates, and the task's others
        (e.g. IdRank's IdGen, frozen encoder layers)."""
        trained = {id(p): p.numel() for group in self.optimizer.param_groups for p in group["params"]}
        frozen = sum(p.numel() for p in self.task.parameters() if id(p) not in trained)
        return sum(trained.values()), frozen

    def summary(self) -> str:
        """What this run trains, on what and where; then the resolved config (YAML, indented)."""
        cfg, place = self.cfg, self.place
        splits = []
        for split, dataset, names in (("train", self.train_set, cfg.dataset.training_data),
                                      ("val", self.val_set, cfg.dataset.validation_data)):
            if dataset is None:
                splits.append(f"{split}: none (the training loss decides the LR and best.tar)")
                continue
            actors, images = dataset_size(dataset)
            splits.append(f"{split}: {actors} actors, {images} images ({', '.join(names)})")
        trained, frozen = self.parameter_counts()
        config = config_yaml(cfg).rstrip("\n").replace("\n", "\n  ")
        return (f"training {STAGE_NAMES[cfg.stage]} ({cfg.name}) from step {self.step} to {cfg.train.max_steps}; "
                f"{'; '.join(splits)}; parameters: {trained:,} trained, {frozen:,} frozen; device {place.device}, "
                f"world size {place.world_size}; config (also in {self.out / CONFIG_NAME}):\n  {config}")

    def _write_config(self) -> None:
        """The resolved config as `config.yaml` in the output folder (a resumed run's too), atomically."""
        with atomic_write(self.out / CONFIG_NAME) as tmp:
            tmp.write_text(config_yaml(self.cfg), encoding="utf-8")

    def _log_settings(self, writer: SummaryWriter) -> None:
        """The config into tensorboard: as text, and as hparams of this run (not a sub-run).

        `SummaryWriter.add_hparams` would write them into a new sub-folder, a second run in
        tensorboard's list holding only a copy of the metric values given; written into the run's
        own event file they sit beside its scalars, and the HParams table reads the metrics
        (train/loss and the metric best.tar follows) from those scalars as training goes.
        """
        text = config_yaml(self.cfg).rstrip("\n")
        writer.add_text("config", "    " + text.replace("\n", "\n    "), self.step)  # indented: shown verbatim
        metrics = {"train/loss": math.nan, PRIMARY_METRIC[self.cfg.stage]: math.nan}  # names only; values from scalars
        for proto in hparams(hparam_values(self.cfg), metrics):  # the experiment, session start and end records
            writer.file_writer.add_summary(proto, self.step)

    def close(self) -> None:
        """Let go of the output folder (rank 0's lock); `fit` does this when it ends."""
        self.lock.release()

    # ------------------------------------------------------------------ checkpoints
    def _on_every_rank(self, prepare: Any) -> None:
        """Run `prepare` on rank 0; an InputError it raises is raised on every rank (none waits for a rank 0
        that stopped)."""
        error = None
        if self.place.is_main:
            try:
                prepare()
            except InputError as err:
                error = err
        if self.place.world_size > 1:
            message = [None if error is None else str(error)]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and error is None:
                error = InputError(message[0])
        if error is not None:
            raise error

    def _prepare_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Check that `train.output_dir` can be written and take its lock (before any work); refuse to
        replace an earlier run's checkpoints unless resuming or told to overwrite; remove temporary
        checkpoint files that a kill during a write left there (no live run writes them: we hold the lock)."""
        try:
            check_output_folder(self.out)
            self.lock.acquire()
        except OutputFolderError as err:  # a config value: reported as the other config errors are
            raise InputError(f"train.output_dir: {err}") from err
        present = [name for name in CHECKPOINT_NAMES if (self.out / name).exists()]
        if present and not overwrite and not (resume and "last.tar" in present):
            files = " and ".join(present)
            held = (f"holds {files} but no last.tar, so --resume cannot continue a run there; pass" if resume else
                    f"already holds {files} of an earlier run; pass --resume to continue it,")
            raise InputError(f"train.output_dir: {self.out} {held} --overwrite to start a new run there (removing "
                             f"{files}), or set another train.output_dir")
        for name in CHECKPOINT_NAMES:
            for stale in remove_stale_temporaries(self.out / name):
                log.info("removed %s, left by a checkpoint write that was interrupted", stale)
        if overwrite:
            for name in present:
                (self.out / name).unlink()
                log.info("--overwrite: removed %s of an earlier run", self.out / name)

    def _read_initial_weights(self, path: Path) -> dict:
        """`train.init_checkpoint`: the file whose weights the stage starts from (of this stage)."""
        ckpt = read_checkpoint(path)
        check_stage(ckpt, self.cfg.stage, path, "train.init_checkpoint")
        return ckpt

    def _read_training_state(self, path: Path) -> tuple[dict, set[str]]:
        """The checkpoint --resume continues and the config keys changed since (see `_changed_settings`)."""
        ckpt = read_checkpoint(path)
        missing = [key for key in TRAINING_STATE if key not in ckpt]
        if missing:
            what = ("a released OFER checkpoint" if is_original(ckpt) else
                    "an inference bundle" if "bundle" in ckpt else "an inference-only file")
            raise CheckpointError(
                f"{path}: holds model weights only ({what}, no {', '.join(missing)}), not a training state, so "
                f"--resume cannot continue from it; to train from these weights, start a new run in another "
                f"train.output_dir with --opt train.init_checkpoint={path}")
        return ckpt, self._changed_settings(ckpt, path)

    def _resume(self, ckpt: dict, changed: set[str], path: Path) -> None:
        """Load the weights, optimiser, scheduler, step and RNG state of `ckpt` (read from `path`)."""
        # With EMA the model entries hold the averaged weights and `train_weights` the raw ones.
        load_state(ckpt.get("train_weights", ckpt), self.task.model, path)
        if self.ema is not None:
            load_state(ckpt, self.ema.module, path)
            self.ema.n_averaged.fill_(ckpt.get("ema_n_averaged", 0))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._apply_changed_settings(changed)
        self.step, self.best, self.seconds = ckpt["step"], ckpt["best"], ckpt.get("train_seconds", 0.0)
        self.recent = list(ckpt.get("recent_losses", []))
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.saved_step = self.step
        log.info("resumed from %s at step %d", path, self.step)

    def _changed_settings(self, ckpt: dict, path: Path) -> set[str]:
        """The config keys that differ from the run being resumed (logged); ConfigError for those it cannot change."""
        if not isinstance(ckpt.get("config"), dict):
            return set()
        old, new = flat_config(config_from_dict(ckpt["config"])), flat_config(self.cfg)
        changed = {key for key in new if old.get(key) != new[key]}
        ema_switched = (old.get("train.ema_decay") is None) != (new["train.ema_decay"] is None)
        fixed = sorted(k for k in changed if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FIXED)
                       or (k == "train.ema_decay" and ema_switched))
        if fixed:
            raise ConfigError(
                f"--resume from {path}: {'; '.join(f'{k} {short_repr(old.get(k))} -> {short_repr(new[k])}' for k in fixed)}: "
                "resuming cannot change these (the saved networks, optimiser state and batch order depend on them); "
                "drop those overrides to resume, or start a new run in another train.output_dir")
        for key in sorted(changed):
            how = "applied to the resumed optimiser and LR scheduler" if key in RESUME_APPLIED else "takes effect"
            log.info("--resume: %s changed from %s to %s (%s)", key, short_repr(old.get(key)), short_repr(new[key]), how)
        return changed

    def _apply_changed_settings(self, changed: set[str]) -> None:
        """Put the new values of RESUME_APPLIED keys into the optimiser and LR scheduler just loaded."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            lr_key = {"net": "rank_lr" if self.cfg.stage == "idrank" else "diff_lr"}.get(group["name"],
                                                                                     f"{group['name']}_lr")
            if f"train.{lr_key}" in changed:
                group["lr"] = getattr(t, lr_key)
            if "train.weight_decay" in changed:
                group["weight_decay"] = t.weight_decay
        if "train.lr_patience" in changed:
            self.scheduler.patience = t.lr_patience
        if "train.lr_factor" in changed:
            self.scheduler.factor = t.lr_factor

    def save(self, name: str) -> Path:
        path = self.out / name
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        extra = {
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "best": self.best,
            "recent_losses": self.recent,
            "train_seconds": self.seconds + time.perf_counter() - self._started,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        if self.ema is not None:  # inference loads the averaged weights under the usual keys
            extra["train_weights"] = {k: getattr(self.task.model, k).state_dict() for k in MODULE_KEYS
                                      if isinstance(getattr(self.task.model, k, None), nn.Module)}
            extra["ema_n_averaged"] = int(self.ema.n_averaged)
        save_checkpoint(path, self.ema.module if self.ema is not None else self.task.model, **extra)
        if name == "last.tar":
            self.saved_step = self.step
        return path

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset: Any, start: int, stop: int, seed: int, rank: int) -> DataLoader:
        sampler = StepBatchSampler(len(dataset), self.cfg.dataset.batch_size, seed, start, stop, rank)
        workers = self.cfg.dataset.num_workers
        # Its own generator: creating a loader must not draw from the global torch RNG (resuming).
        return DataLoader(StepIndexed(dataset), batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.place.device.type == "cuda",
                          generator=torch.Generator().manual_seed(seed))

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """Inside the block the stage module holds the EMA weights (when EMA is on)."""
        if self.ema is None:
            yield
            return
        raw = {k: v.clone() for k, v in self.task.model.state_dict().items()}
        self.task.model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.task.model.load_state_dict(raw)

    def validate(self) -> dict[str, float]:
        """Average the task's validation metrics over `val_batches` fixed batches (same on every rank)."""
        with self._averaged_weights():
            return self._validate()

    def _validate(self) -> dict[str, float]:
        self.task.eval()
        generator = torch.Generator(self.place.device).manual_seed(self.cfg.train.seed)
        sums: dict[str, float] = {}
        loader = self._loader(self.val_set, 0, self.cfg.train.val_batches, self.cfg.train.seed + 1, rank=0)
        for batch in loader:
            for k, v in self.task.validate(to_device(batch, self.place.device), generator).items():
                sums[k] = sums.get(k, 0.0) + v / len(loader)
        if hasattr(self.task, "picture") and self.place.is_main:
            self.last_picture = self.task.picture(to_device(next(iter(loader)), self.place.device), generator)
        self.task.train()
        return sums

    def fit(self) -> Path:
        """Train until `train.max_steps`; return the path of the last checkpoint."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> Path:
        place = self.place
        model: nn.Module = self.task
        if place.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                self.task, device_ids=[place.device.index] if place.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True,
            )
        # Closed also when a step raises or is interrupted, so what was logged reaches the event file.
        with SummaryWriter(str(self.out / "tb")) if place.is_main else contextlib.nullcontext() as writer:
            return self._loop(model, writer)

    def _loop(self, model: nn.Module, writer: SummaryWriter | None) -> Path:
        """The training steps from `self.step` to `train.max_steps`, with validation and checkpoints."""
        cfg, place = self.cfg, self.place
        if writer:
            self._log_settings(writer)
        loader = self._loader(self.train_set, self.step, cfg.train.max_steps, cfg.train.seed, place.rank)
        self.task.train()
        last = self.out / "last.tar"
        self._started = time.perf_counter()
        with progress(total=cfg.train.max_steps, initial=self.step, disable=not place.is_main,
                      desc=cfg.stage) as bar:  # closed also when a step raises
            for index, batch in enumerate(loader):
                if writer and index == 0:  # this process's first batch, as the networks see it
                    writer.add_image("train/inputs", input_picture(batch)[..., ::-1].copy(), self.step,
                                     dataformats="HWC")
                batch = to_device(batch, place.device)
                with torch.autocast(place.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = model(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip:
                    nn.utils.clip_grad_norm_(self.task.parameters(), cfg.train.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.task.model)
                self.step += 1
                self.recent.append(self._mean_over_ranks(loss.item()))
                bar.update(1)
                bar.set_postfix(loss=f"{self.recent[-1]:.4f}", refresh=False)
                if writer and self.step % cfg.train.log_steps == 0:
                    writer.add_scalar("train/loss", float(np.mean(self.recent[-cfg.train.log_steps :])), self.step)
                    for group in self.optimizer.param_groups:
                        writer.add_scalar(f"lr/{group['name']}", group["lr"], self.step)
                done = self.step >= cfg.train.max_steps
                if self.step % cfg.train.val_steps == 0 or done:
                    self._after_validation(writer)
                    self.recent = []
                if place.is_main and (self.step % cfg.train.checkpoint_steps == 0 or done):
                    last = self.save("last.tar")
        if place.world_size > 1:
            dist.destroy_process_group()
        return last

    def _mean_over_ranks(self, value: float) -> float:
        """`value` averaged over all processes (itself on one): every rank then decides alike."""
        if self.place.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.place.device)
        dist.all_reduce(total)
        return total.item() / self.place.world_size

    def _after_validation(self, writer: SummaryWriter | None) -> None:
        """Validate (or fall back to the mean training loss), step the LR scheduler, keep the best.

        The deciding value is averaged over ranks, so all ranks step their schedulers alike.
        """
        metrics = self.validate() if self.val_set is not None else {}
        key = PRIMARY_METRIC[self.cfg.stage]
        value = self._mean_over_ranks(metrics.get(key, float(np.mean(self.recent)) if self.recent else math.inf))
        self.scheduler.step(value)
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(k, v, self.step)
            if self.last_picture is not None:  # BGR -> RGB for tensorboard
                writer.add_image(self.task.picture_tag, self.last_picture[..., ::-1].copy(), self.step, dataformats="HWC")
        if metrics:
            if not self._metrics_explained:
                log.info("validation metrics: %s", "; ".join(f"{k}: {METRIC_NOTES[k]}" for k in metrics if k in METRIC_NOTES))
                self._metrics_explained = True
            log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if value < self.best:
            self.best = value
            if self.place.is_main:
                self.save("best.tar")

