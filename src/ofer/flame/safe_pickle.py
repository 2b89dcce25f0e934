"""Restricted loading of FLAME assets: the model ``.pkl`` and ``landmark_embedding.npy``.

Both files are Python pickles, and a pickle can name any importable callable. The real FLAME
files also contain ``chumpy`` objects, and chumpy does not import with current numpy. So we
never use ``pickle.load``/``np.load(allow_pickle=True)`` on them: a restricted unpickler
resolves only an explicit allow-list of globals (numpy array reconstruction, scipy.sparse
matrices, torch tensor rebuild for the landmark file) and maps every ``chumpy.*`` class to a
stub that keeps the object's pickled state; after loading, each stub becomes the numpy array
in ``state['x']``. Every other global raises :class:`UnsafePickleError` before anything runs.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from ofer.io import InputError

FLAME_DOWNLOAD_HINT = (
    "download FLAME 2020 (generic_model.pkl) or FLAME 2023 (flame2023.pkl) from https://flame.is.tue.mpg.de "
    "and put it in pretrained/FLAME2020/ or pretrained/FLAME2023/ (see pretrained/README.md), or point "
    "model.flame_model_path and model.flame_lmk_embedding_path at your copy (--opt key=value)"
)

_SPARSE_CLASSES = frozenset(
    f"{fmt}_{kind}" for fmt in ("csc", "csr", "coo", "lil", "dok", "bsr", "dia") for kind in ("matrix", "array")
)
_TORCH_STORAGES = frozenset(
    f"{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
)


class PickleFileError(pickle.UnpicklingError, InputError):
    """A pickled asset file is truncated, not a pickle, or refused (the message names the file)."""


class UnsafePickleError(PickleFileError):
    """A pickle asked for a global outside the allow-list (or tried to modify one)."""


class _ChumpyStub:
    """Placeholder for a chumpy object: records the pickled state, runs no chumpy code."""

    chumpy_name = "chumpy"
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_chumpy_stub_classes: dict[str, type] = {}


def _chumpy_stub(qualified_name: str) -> type:
    """One stub subclass per chumpy class name, so errors can say which class it was."""
    if qualified_name not in _chumpy_stub_classes:
        _chumpy_stub_classes[qualified_name] = type(
            qualified_name.rsplit(".", 1)[-1], (_ChumpyStub,), {"chumpy_name": qualified_name}
        )
    return _chumpy_stub_classes[qualified_name]


def _load_torch_storage(data: bytes) -> Any:
    """Safe replacement for ``torch.storage._load_from_bytes`` (torch's own weights-only loader)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _reconstruct_object(cls: type, base: type, state: Any) -> Any:
    """Guarded ``copyreg._reconstructor`` (protocol 0/1 pickles): only ``object.__new__``."""
    allowed_bases = (_ChumpyStub, scipy.sparse.spmatrix, scipy.sparse.sparray)
    if base is not object or not (isinstance(cls, type) and issubclass(cls, allowed_bases)):
        raise UnsafePickleError(f"copyreg._reconstructor refused for {cls!r} with base {base!r}")
    return object.__new__(cls)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return table


def _builtin_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    import collections

    table: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): _codecs.encode,  # protocol-2 pickles of bytes written by Python 3
        ("collections", "OrderedDict"): collections.OrderedDict,  # torch tensor backward hooks
    }
    for module in ("copy_reg", "copyreg"):  # Python 2 and 3 spellings
        table[(module, "_reconstructor")] = _reconstruct_object
    for module in ("__builtin__", "builtins"):
        table[(module, "object")] = object
        table[(module, "set")] = set  # chumpy's state holds sets (its '_dirty_vars')
        table[(module, "frozenset")] = frozenset
    return table


def _torch_global(module: str, name: str) -> Any:
    """The torch tensor-rebuild globals of a plainly pickled tensor, or None."""
    if (module, name) == ("torch.storage", "_load_from_bytes"):
        return _load_torch_storage
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        import torch._utils

        return getattr(torch._utils, name)
    if module == "torch" and name in _TORCH_STORAGES:
        import torch

        return getattr(torch, name)
    return None


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler with an allow-list of globals and a guarded BUILD opcode.

    The pure-Python class is used (not the C one) because BUILD must be intercepted: it would
    otherwise let a pickle set attributes on an allowed class or function object.
    """

    _allowed = {**_numpy_globals(), **_builtin_globals()}

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None and (module == "chumpy" or module.startswith("chumpy.")):
            found = _chumpy_stub(f"{module}.{name}")
        if found is None and (module == "scipy.sparse" or module.startswith("scipy.sparse.")):
            # Old files name private module paths (scipy.sparse.csc); map to today's classes.
            found = getattr(scipy.sparse, name) if name in _SPARSE_CLASSES else None
        if found is None and (module == "torch" or module.startswith("torch.")):
            found = _torch_global(module, name)
        if found is None:
            raise UnsafePickleError(
                f"refused to load global '{module}.{name}' (only numpy arrays, "
                "scipy.sparse matrices, chumpy arrays and torch tensors are allowed)"
            )
        return found

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)):
            raise UnsafePickleError(f"refused to set state on {target!r}")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"persistent ids are not supported (got {pid!r})")


class _PlainDataUnpickler(_RestrictedUnpickler):
    """Containers, strings and numpy arrays only: for list files, which need nothing more."""

    _allowed = {**_numpy_globals(), ("_codecs", "encode"): _builtin_globals()[("_codecs", "encode")]}

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"refused to load global '{module}.{name}' (only containers, strings and numpy arrays are allowed)"
            )
        return found


def _to_numpy(obj: Any, source: str) -> Any:
    """Replace chumpy stubs and torch tensors by numpy arrays, recursing into containers."""
    if isinstance(obj, _ChumpyStub):
        state = obj.state
        if not isinstance(state, dict) or "x" not in state:
            raise InputError(f"{source}: chumpy object {obj.chumpy_name} has no array state 'x'")
        return np.asarray(_to_numpy(state["x"], source))
    if isinstance(obj, dict):
        return {key: _to_numpy(value, source) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(value, source) for value in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        converted = np.empty(obj.shape, dtype=object)
        for index, value in np.ndenumerate(obj):
            converted[index] = _to_numpy(value, source)
        return converted
    torch = sys.modules.get("torch")  # a tensor can only be here if torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    return obj


def _unpickle(file: Any, source: str, plain_data: bool = False) -> Any:
    try:
        loaded = (_PlainDataUnpickler if plain_data else _RestrictedUnpickler)(file).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{source}: {error}") from None
    except UnicodeDecodeError as error:  # a text string of the pickle (protocol 3+ strings are UTF-8)
        raise PickleFileError(f"{source}: a string in the pickle is not UTF-8 text ({error.reason}: byte "
                              f"{error.object[error.start:error.start + 1]!r} in {error.object[:40]!r})") from None
    except Exception as error:  # a malformed pickle makes the unpickler raise many types
        raise PickleFileError(f"{source}: truncated or not a pickle ({error!r})") from error
    return _to_numpy(loaded, source)


def _numeric_array(value: Any, dtype: type, path: Path, key: str) -> np.ndarray:
    """`value` as a finite numeric array of `dtype`; an InputError naming the file and key otherwise."""
    if scipy.sparse.issparse(value):
        value = value.toarray()
    try:
        array = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as error:
        raise InputError(f"{path}: key '{key}' is not a numeric array ({error})") from None
    if not np.all(np.isfinite(array)):
        raise InputError(f"{path}: key '{key}' holds NaN or infinite values")
    return array


def load_npy_object(path: str | os.PathLike, plain_data: bool = False) -> Any:
    """Read an .npy file; one holding a pickled object (``np.save`` of a dict) is unpickled safely.

    ``np.load`` would need ``allow_pickle=True``; instead the .npy header is parsed here and the
    pickle payload goes through the restricted unpickler (`plain_data`: containers, strings and
    numpy arrays only). A numeric array loads as with ``allow_pickle=False``; a 0-d object
    array (how ``np.save`` stores a dict) is unwrapped to the object.
    """
    path = Path(path)
    with path.open("rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            _, _, dtype = read_header(file)
        except ValueError as error:
            raise InputError(f"{path}: not a valid .npy file ({error})") from error
        if not dtype.hasobject:
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:  # e.g. truncated data
                raise InputError(f"{path}: not a readable .npy file ({error})") from error
        obj = _unpickle(file, str(path), plain_data)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.ndim == 0:
        return obj.item()
    return obj


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a FLAME-style pickle safely; chumpy objects and torch tensors come back as numpy.

    Raises FileNotFoundError if the file is missing and :class:`UnsafePickleError` (naming
    the file and the refused ``module.name``) if it references anything off the allow-list.
    """
    path = Path(path)
    with path.open("rb") as file:
        return _unpickle(file, str(path))


def load_flame_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a FLAME model file (2020 ``generic_model.pkl`` or 2023) into plain numpy arrays.

    Returns ``v_template`` (V,3) float64, ``f`` (F,3) int64, ``shapedirs`` (V,3,K) float64
    (K = 300 identity + expression columns), ``posedirs`` (V,3,36) float64, ``J_regressor``
    (5,V) dense float64, ``kintree_table`` (2,5) int64, ``weights`` (V,5) float64.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME model not found at {path}: {FLAME_DOWNLOAD_HINT}")
    raw = load_pickle(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a pickled dict (a FLAME model), got {type(raw).__name__}")

    def array(key: str, dtype: type) -> np.ndarray:
        if key not in raw:
            raise InputError(f"{path}: missing key '{key}' (not a FLAME model file?)")
        return _numeric_array(raw[key], dtype, path, key)

    model = {
        "v_template": array("v_template", np.float64),
        "f": array("f", np.int64),
        "shapedirs": array("shapedirs", np.float64),
        "posedirs": array("posedirs", np.float64),
        "J_regressor": array("J_regressor", np.float64),
        "kintree_table": array("kintree_table", np.int64),
        "weights": array("weights", np.float64),
    }
    num_vertices = model["v_template"].shape[0]
    num_joints = model["kintree_table"].shape[-1]
    expected = {
        "v_template": (num_vertices, 3),
        "f": (model["f"].shape[0], 3),
        "shapedirs": (num_vertices, 3, model["shapedirs"].shape[-1]),
        "posedirs": (num_vertices, 3, 9 * (num_joints - 1)),
        "J_regressor": (num_joints, num_vertices),
        "kintree_table": (2, 5),
        "weights": (num_vertices, num_joints),
    }
    for key, shape in expected.items():
        if model[key].shape != shape:
            raise InputError(f"{path}: key '{key}' has shape {model[key].shape}, expected {shape}")
    if model["f"].min() < 0 or model["f"].max() >= num_vertices:
        raise InputError(f"{path}: key 'f' has vertex indices outside [0, {num_vertices})")
    return model


LANDMARK_SHAPES = {
    "static_lmk_faces_idx": (51,),
    "static_lmk_bary_coords": (51, 3),
    "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3),
    "full_lmk_faces_idx": (1, 68),
    "full_lmk_bary_coords": (1, 68, 3),
}


def load_landmark_embedding(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read FLAME's ``landmark_embedding.npy`` (an .npy holding a pickled dict) as numpy arrays.

    Read through `load_npy_object` (restricted unpickler). Returns the keys of
    ``LANDMARK_SHAPES`` with those shapes (face indices int64, barycentrics float64).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark embedding not found at {path}: it ships with FLAME; {FLAME_DOWNLOAD_HINT}")
    raw = load_npy_object(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a pickled dict of landmark arrays, got {type(raw).__name__}")
    embedding = {}
    for key, shape in LANDMARK_SHAPES.items():
        if key not in raw:
            raise InputError(f"{path}: missing key '{key}'")
        dtype = np.int64 if key.endswith("faces_idx") else np.float64
        embedding[key] = _numeric_array(raw[key], dtype, path, key)
        if embedding[key].shape != shape:
            raise InputError(f"{path}: key '{key}' has shape {embedding[key].shape}, expected {shape}")
    return embedding
