"""Training datasets in the MICA/OFER on-disk layout: identity (IdGen, IdRank) and expression (ExpGen).

Both datasets read, per dataset ``NAME`` under ``cfg.root`` (SPEC §8):

- ``NAME/arcface_input/<actor>/<img>.jpg``: the 224x224 face crop (any size is resized,
  CLIP-style: bicubic on the short side to 224, then centre crop), and beside it
  ``<img>.npy``: the (3, 112, 112) float32 ArcFace input;
- FLAME fits under ``NAME/<cfg.params_dir>/`` (``FLAME_parameters`` for MICA,
  ``FLAME23_parameters`` for OFER);
- a list file ``<cfg.root>/<cfg.list_dir>/NAME.npy``: a pickled dict saved with
  ``np.save(..., allow_pickle=True)``. It is read with a restricted unpickler that rebuilds only
  Python containers, strings and numpy arrays/scalars; any other global (``os.system``, ...) is
  refused before anything runs.

Identity list files map actor -> images and one fit, in either order (detected per entry):
MICA ``([image relpaths], npz relpath)``, OFER ``[npz relpath, [image relpaths]]``. Fits hold
``betas`` (MICA: 300 shape + 100 expression) or ``shape`` (OFER: 300).

Expression list files (ours, mirroring the identity layout) map actor -> a list of
``[image relpath, parameter relpath]`` pairs, one per frame. A parameter file is one of:
TEMPEH/FaMoS ``.npz`` (``exp`` >= 50, ``pose`` = [neck 0:3, jaw 3:6, eyes 6:], optional ``shape``);
MICA-style ``.npz`` (``betas`` with expression at 300:, ``pose`` 15 with jaw at 6:9);
CoMA ``.npy`` (a pickled dict with ``shape, exp, jaw, rot, eye, neck, trans``).

Relative paths in list files are ambiguous in the wild, so each is resolved against two bases
and the first that exists wins: images against ``NAME/arcface_input/`` then ``NAME/``; fits and
parameter files against ``NAME/<params_dir>/`` then ``NAME/``.

Mixing several datasets in proportion to their actor (or frame) counts is the concatenation of
their index spaces under a uniform sampler, so one dataset object covers all names.

A bad file (missing, unreadable, wrong array shape, non-finite values) raises `InputError`
naming it, or with ``cfg.on_bad_sample == "skip"`` is skipped: logged once, counted in
`bad_samples`, and replaced by another draw (an actor or frame with nothing usable left is
replaced by another one). The bookkeeping lives in each process: with DataLoader workers,
each worker keeps its own count.

Sampling is deterministic per (seed, epoch, index): call `set_epoch` before creating each
epoch's DataLoader iterator (workers copy the dataset when the iterator starts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ofer.config import DatasetConfig
from ofer.encoders.normalise import ARCFACE_RANGE, ARCFACE_SIZE, clip_normalise_bgr, crop_to_clip_input
from ofer.flame.safe_pickle import load_npy_object
from ofer.io import InputError, load_array, read_image, short_repr
from ofer.preprocess import typical_arcface_matrix

logger = logging.getLogger(__name__)

SHAPE_DIM = 300  # FLAME identity coefficients stored in every fit
JAW_DIM = 3
SPLITS = ("train", "val", "test")

_IDENTITY_LAYOUT = (
    "a dict actor -> ([image relpaths], npz relpath) (MICA) or [npz relpath, [image relpaths]] (OFER)"
)
_EXPRESSION_LAYOUT = "a dict actor -> list of [image relpath, parameter relpath] pairs"


# ----------------------------------------------------------------------------- safe pickles


def load_pickled_npy(path: str | Path) -> Any:
    """Load a list file (an .npy holding a pickled dict) with the restricted unpickler.

    Only containers, strings and numpy arrays may appear; anything else is refused without
    being executed. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return load_npy_object(path, plain_data=True)
    except InputError:  # names the file and says what is wrong
        raise
    except Exception as err:  # a corrupt or hostile pickle stream can raise almost any exception
        raise InputError(f"{path}: not a readable list file ({err})") from err


# ----------------------------------------------------------------------------- helpers


def _as_str(value: Any) -> str | None:
    """A list-file path as str (numpy strings included), or None if it is not a string."""
    return str(value) if isinstance(value, (str, np.str_)) else None


def _as_str_list(value: Any) -> list[str] | None:
    """A list-file sequence of paths as list[str], or None if it is not one."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    items = [_as_str(v) for v in value]
    return None if any(v is None for v in items) else items


def _read_list_file(path: Path, layout: str) -> dict:
    """Load a list file's dict; errors name the file and the expected layout."""
    if not path.is_file():
        raise InputError(f"{path}: list file not found; expected an .npy holding {layout}")
    table = load_pickled_npy(path)
    if not isinstance(table, dict):
        raise InputError(f"{path}: expected {layout}, found {type(table).__name__}")
    return table


def _key_list(mapping: Any) -> str:
    """The keys of a loaded dict for a message: sorted by their text (keys of mixed types do not sort), at most 20."""
    names = sorted(key if isinstance(key, str) else short_repr(key) for key in mapping)
    return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _vector(arrays: Any, key: str, path: Path, start: int, size: int) -> np.ndarray:
    """Entries [start, start+size) of the flattened array `arrays[key]` as float32; errors name the file."""
    if key not in arrays:
        raise InputError(f"{path}: missing key '{key}' (found {_key_list(arrays)})")
    try:
        values = np.asarray(arrays[key], dtype=np.float32).reshape(-1)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: '{key}' is not numeric ({err})") from err
    if values.size < start + size:
        raise InputError(f"{path}: '{key}' has {values.size} values, need at least {start + size}")
    values = values[start : start + size]
    if not np.isfinite(values).all():
        raise InputError(f"{path}: '{key}' holds non-finite values")
    return values


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz (no pickles) as a dict; errors name the file."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as err:  # zipfile/numpy raise many types for corrupt archives
        raise InputError(f"{path}: not a readable .npz file ({err})") from err


# ----------------------------------------------------------------------------- base


class _FaceDataset(Dataset):
    """Shared machinery: path resolution, (224 crop, ArcFace input) loading, occlusion, bad files.

    A subclass fills `self.records` (items with `dataset` and `actor`) with `_read_records`
    and implements `_load_item(index, rng) -> dict | None` (None: nothing usable, in skip mode).
    """

    def __init__(self, cfg: DatasetConfig, names: list[str], split: str, seed: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not names:
            raise ValueError("no dataset names given")
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.split = split
        self.seed = seed
        self.epoch = 0
        self.bad_samples = 0
        self._bad_keys: set[tuple] = set()  # bad files and list entries met in this process
        self._bad_items: set[int] = set()  # indices with nothing usable left (skip mode)
        for name in names:
            if not (self.root / name).is_dir():
                raise InputError(f"{self.root / name}: dataset folder not found (from names {names})")
        self.occlusion = self._build_occlusion() if cfg.occlusion.enabled and split == "train" else None

    def _build_occlusion(self) -> Callable:
        # Imported here so that data loading without occlusion never needs the augmenter.
        from ofer.data.occlusion import OcclusionAugment

        occ = self.cfg.occlusion
        return OcclusionAugment(prob=occ.prob, min_area=occ.min_area, max_area=occ.max_area, kinds=occ.kinds)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draws __getitem__ makes (deterministic per seed, epoch, index)."""
        self.epoch = int(epoch)

    def _list_path(self, name: str) -> Path:
        return self.root / self.cfg.list_dir / f"{name}.npy"

    def _resolve(self, name: str, rel: str, subdir: str) -> Path:
        """First existing of NAME/subdir/rel and NAME/rel (the former when neither exists)."""
        first = self.root / name / subdir / rel
        if first.exists():
            return first
        second = self.root / name / rel
        return second if second.exists() else first

    def _load_pair(self, name: str, image_rel: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One image: (3, 224, 224) CLIP-normalised RGB crop and (3, 112, 112) ArcFace input."""
        image_path = self._resolve(name, image_rel, "arcface_input")
        image = crop_to_clip_input(read_image(image_path))  # (224, 224, 3) uint8 BGR
        arcface_path = image_path.with_suffix(".npy")
        # The same checks as test.py's inputs (ofer.inference.pipeline.load_inputs): real numbers, finite, in range.
        arcface = load_array(arcface_path, (3, ARCFACE_SIZE, ARCFACE_SIZE), ARCFACE_RANGE).astype(np.float32)
        if self.occlusion is not None:
            # No stored alignment in this layout: map the occluder with a typical face's.
            image, arcface, _ = self.occlusion(image, arcface, typical_arcface_matrix(), rng)
        return clip_normalise_bgr(image), np.ascontiguousarray(arcface, dtype=np.float32)

    def _skip(self, key: Any, err: InputError) -> None:
        """Raise `err`, or (skip mode) remember `key` as bad, counting and logging it once."""
        if self.cfg.on_bad_sample == "raise":
            raise err
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            self.bad_samples += 1
            logger.warning("skipping bad sample: %s", err)

    def _read_records(self, names: list[str], read: Callable[[str], list], what: str) -> list:
        """Concatenate the records of every dataset (mixing in proportion to their sizes)."""
        records = [record for name in names for record in read(name)]
        if not records:
            raise InputError(f"no {what} listed in {[str(self._list_path(n)) for n in names]}")
        return records

    @property
    def actors(self) -> list[tuple[str, str]]:
        """(dataset, actor) of every index (an expression actor appears once per frame)."""
        return [(r.dataset, r.actor) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _load_item(self, index: int, rng: np.random.Generator) -> dict | None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        """Item `index`; in skip mode an unusable one is replaced by a random other item.

        Attempt a uses its own generator seeded by (seed, epoch, index, a), so the result does
        not depend on which bad files this process has already met.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        attempt, current = 0, index
        while True:
            rng = np.random.default_rng([self.seed, self.epoch, index, attempt])
            if attempt > 0:
                current = int(rng.integers(len(self)))
            if current not in self._bad_items:
                item = self._load_item(current, rng)
                if item is not None:
                    return item
                self._bad_items.add(current)
            if len(self._bad_items) == len(self):
                raise InputError(f"no usable samples left in datasets under {self.root}")
            attempt += 1


# ----------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class ActorRecord:
    """One actor of an identity dataset: its images and its FLAME fit (relative paths)."""

    dataset: str
    actor: str
    images: tuple[str, ...]
    fit: str


class IdentityDataset(_FaceDataset):
    """Actors of one or more identity datasets (IdGen, IdRank); one item = one actor.

    Item: ``image`` (K, 3, 224, 224) float32 CLIP-normalised RGB, ``arcface`` (K, 3, 112, 112)
    float32, ``shape`` (n_shape,) float32 (the actor's FLAME shape, shared by its K images),
    ``actor`` and ``dataset`` strings; K = ``cfg.n_images`` images drawn with replacement.
    """

    def __init__(
        self, cfg: DatasetConfig, names: list[str], n_shape: int = SHAPE_DIM, split: str = "train", seed: int = 0
    ) -> None:
        super().__init__(cfg, names, split, seed)
        if not 1 <= n_shape <= SHAPE_DIM:
            raise ValueError(f"n_shape must be in [1, {SHAPE_DIM}], got {n_shape}")
        if cfg.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {cfg.n_images}")
        self.n_shape = n_shape
        self.records: list[ActorRecord] = self._read_records(names, self._read_actors, "actors")

    def _read_actors(self, name: str) -> list[ActorRecord]:
        path = self._list_path(name)
        records = []
        for actor, entry in _read_list_file(path, _IDENTITY_LAYOUT).items():
            parts = list(entry) if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
            images = fit = None
            if parts is not None:
                if _as_str(parts[1]) is not None:  # MICA: (images, fit)
                    images, fit = _as_str_list(parts[0]), _as_str(parts[1])
                elif _as_str(parts[0]) is not None:  # OFER: [fit, images]
                    fit, images = _as_str(parts[0]), _as_str_list(parts[1])
            if images is None or fit is None:
                raise InputError(f"{path}: entry for actor {short_repr(actor)} does not match {_IDENTITY_LAYOUT}")
            if not images:
                self._skip(("list", name, str(actor)), InputError(f"{path}: actor {short_repr(actor)} lists no images"))
                continue
            records.append(ActorRecord(name, str(actor), tuple(images), fit))
        return records

    def _load_item(self, index: int, rng: np.random.Generator) -> dict | None:
        record = self.records[index]
        fit_path = self._resolve(record.dataset, record.fit, self.cfg.params_dir)
        try:
            arrays = _load_npz(fit_path)
            key = "shape" if "shape" in arrays else "betas" if "betas" in arrays else None
            if key is None:
                raise InputError(f"{fit_path}: expected key 'shape' (OFER) or 'betas' (MICA), found {_key_list(arrays)}")
            shape = _vector(arrays, key, fit_path, 0, self.n_shape)
        except InputError as err:
            self._skip(("file", record.dataset, record.fit), err)
            return None
        bad = {i for i, rel in enumerate(record.images) if ("file", record.dataset, rel) in self._bad_keys}
        images, arcfaces = [], []
        while len(images) < self.cfg.n_images:
            if len(bad) == len(record.images):
                return None
            # Draw from the full list and reject bad ones, so the draws do not depend on what is known.
            choice = int(rng.integers(len(record.images)))
            if choice in bad:
                continue
            try:
                image, arcface = self._load_pair(record.dataset, record.images[choice], rng)
            except InputError as err:
                self._skip(("file", record.dataset, record.images[choice]), err)
                bad.add(choice)
                continue
            images.append(image)
            arcfaces.append(arcface)
        return {
            "image": torch.from_numpy(np.stack(images)),  # (K, 3, 224, 224)
            "arcface": torch.from_numpy(np.stack(arcfaces)),  # (K, 3, 112, 112)
            "shape": torch.from_numpy(shape),  # (n_shape,)
            "actor": record.actor,
            "dataset": record.dataset,
        }


# ----------------------------------------------------------------------------- expression


@dataclass(frozen=True)
class FrameRecord:
    """One frame of an expression dataset: its image and its FLAME parameter file (relative paths)."""

    dataset: str
    actor: str
    image: str
    params: str


def read_expression_params(
    path: Path, n_exp: int = 50, n_shape: int = SHAPE_DIM
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Expression (n_exp,), jaw pose (3,) and shape (n_shape,) or None from one parameter file.

    TEMPEH/FaMoS .npz: ``exp``, jaw = ``pose``[3:6]; MICA .npz: expression = ``betas``[300:],
    jaw = ``pose``[6:9]; CoMA .npy dict: ``exp``, ``jaw``. Shape comes from ``shape`` or the
    first 300 ``betas`` when present.
    """
    if path.suffix == ".npz":
        arrays = _load_npz(path)
        if "exp" in arrays:  # TEMPEH/FaMoS
            expression, jaw = _vector(arrays, "exp", path, 0, n_exp), _vector(arrays, "pose", path, 3, JAW_DIM)
        elif "betas" in arrays:  # MICA
            expression = _vector(arrays, "betas", path, SHAPE_DIM, n_exp)
            jaw = _vector(arrays, "pose", path, 6, JAW_DIM)
        else:
            raise InputError(
                f"{path}: expected TEMPEH keys (exp, pose) or MICA keys (betas, pose), found {_key_list(arrays)}"
            )
    elif path.suffix == ".npy":
        arrays = load_pickled_npy(path)
        if not isinstance(arrays, dict):
            raise InputError(
                f"{path}: expected a CoMA dict with keys exp, jaw, ..., found {type(arrays).__name__}"
            )
        expression, jaw = _vector(arrays, "exp", path, 0, n_exp), _vector(arrays, "jaw", path, 0, JAW_DIM)
    else:
        raise InputError(f"{path}: unsupported parameter file type (expected .npz or .npy)")
    shape_key = "shape" if "shape" in arrays else "betas" if "betas" in arrays else None
    shape = _vector(arrays, shape_key, path, 0, n_shape) if shape_key else None
    return expression, jaw, shape


class ExpressionDataset(_FaceDataset):
    """Frames of one or more expression datasets (ExpGen); one item = one (image, parameters) pair.

    Item: ``image`` (1, 3, 224, 224), ``arcface`` (1, 3, 112, 112) (K = 1 so batches look like
    identity batches), ``expression`` (n_exp,), ``jaw`` (3,), ``target`` (n_exp + 3,) =
    cat(expression, jaw), ``shape`` (n_shape,) (zeros when the file has none), ``actor``,
    ``dataset``.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        names: list[str],
        n_exp: int = 50,
        split: str = "train",
        seed: int = 0,
        n_shape: int = SHAPE_DIM,
    ) -> None:
        super().__init__(cfg, names, split, seed)
        self.n_exp = n_exp
        self.n_shape = n_shape
        self.records: list[FrameRecord] = self._read_records(names, self._read_frames, "frames")

    def _read_frames(self, name: str) -> list[FrameRecord]:
        path = self._list_path(name)
        records = []
        for actor, frames in _read_list_file(path, _EXPRESSION_LAYOUT).items():
            if isinstance(frames, np.ndarray):
                frames = frames.tolist()
            pairs = [_as_str_list(pair) for pair in frames] if isinstance(frames, (list, tuple)) else [None]
            if any(pair is None or len(pair) != 2 for pair in pairs):
                raise InputError(f"{path}: entry for actor {short_repr(actor)} does not match {_EXPRESSION_LAYOUT}")
            records.extend(FrameRecord(name, str(actor), image, params) for image, params in pairs)
        return records

    def _load_item(self, index: int, rng: np.random.Generator) -> dict | None:
        record = self.records[index]
        params_path = self._resolve(record.dataset, record.params, self.cfg.params_dir)
        try:
            expression, jaw, shape = read_expression_params(params_path, self.n_exp, self.n_shape)
            image, arcface = self._load_pair(record.dataset, record.image, rng)
        except InputError as err:
            self._skip(("file", record.dataset, record.image, record.params), err)
            return None
        if shape is None:
            shape = np.zeros(self.n_shape, dtype=np.float32)
        return {
            "image": torch.from_numpy(image[None]),  # (1, 3, 224, 224)
            "arcface": torch.from_numpy(arcface[None]),  # (1, 3, 112, 112)
            "expression": torch.from_numpy(expression),  # (n_exp,)
            "jaw": torch.from_numpy(jaw),  # (3,)
            "target": torch.from_numpy(np.concatenate([expression, jaw])),  # (n_exp + 3,)
            "shape": torch.from_numpy(shape),  # (n_shape,)
            "actor": record.actor,
            "dataset": record.dataset,
        }
