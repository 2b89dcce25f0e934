"""File input/output in one place: output folders, atomic writes, images, meshes and arrays.

Every output of the project goes through `atomic_write` so that an interrupted run never
leaves a half-written file that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import reprlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (there is no getter)


class InputError(ValueError):
    """A user-provided file is missing, unreadable or has the wrong content."""


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def short_repr(value: object) -> str:
    """`repr(value)` cut to about a line, for error messages about user data.

    Bounded in depth and length, so a value that is huge or repeats a shared structure (a YAML
    alias bomb, a pickle's shared references) costs no more to show than a short one.
    """
    return _SHORT.repr(value)


def failure_reason(err: Exception, context: str | None = None) -> str:
    """Why one item of a run failed, as its report records it.

    An InputError is told as it is: its message already names the file. Any other exception
    (a library's, a bug) gets its type, and `context` in front when given, to say which file
    and which step, since its message may name neither.
    """
    if isinstance(err, InputError):
        return str(err)
    described = f"{type(err).__name__}: {err}"
    return described if context is None else f"{context}: {described}"


class WriteError(OSError):
    """An output file could not be written (disk full, no permission); the old file is kept."""


class OutputFolderError(OSError):
    """An output folder cannot be used: not a folder, not writable, or (test.py) in use by another run."""


def check_output_folder(out: str | os.PathLike) -> None:
    """Create `out` if needed and prove a file can be written in it; raise OutputFolderError saying why.

    Run before any work, so that a bad output folder stops a run at once rather than at its first write.
    """
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputFolderError(f"output folder {out}: {parent} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"output folder {out} cannot be created: {err.strerror or err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputFolderError(f"output folder {out} is not writable (permissions)")
    try:  # catches what os.access cannot see: a read-only file system, a full disk
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputFolderError(f"output folder {out} is not writable: {err.strerror or err}") from err


_TEMP_RANDOM = "[a-z0-9_]" * 8  # the random part of a `tempfile.mkstemp` name


def _temporary_pattern(path: Path, suffix: str | None = None) -> str:
    """Glob pattern of the temporary names `atomic_write(path)` uses: `.<stem>.XXXXXXXX<suffix>`."""
    return glob.escape(f".{path.stem}.") + _TEMP_RANDOM + glob.escape(suffix or path.suffix)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file keeps the target's suffix (or `suffix`) so that libraries choosing
    a format by extension (OpenCV, numpy) write the right one. An OSError while writing
    (e.g. a full disk) becomes a `WriteError` naming `path` and saying that a previous
    version of it, if any, is intact.
    """
    path = Path(path)
    existed = path.exists()
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix or path.suffix)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        kept = f"the previous {path.name} is intact" if existed else "no file was left there"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WriteError(f"{path}: could not be written ({reason}); {kept}") from err
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write(path)` (e.g. a kill) left beside `path`.

    Only names of `atomic_write`'s own pattern for this target are touched. Returns them. A live
    run's write in progress has the same names: call this only while holding the folder's lock
    (`ofer.lock.FolderLock`), so that no other run writes there.
    """
    path = Path(path)
    stale = sorted(p for p in path.parent.glob(_temporary_pattern(path)) if p.is_file())
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


MAX_IMAGE_PIXELS = 10_000 * 10_000  # far above any photo we expect; OpenCV's own limit is 2**30


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; raise InputError naming the file (and the line of a bad byte).

    For the text files users write (lists, keypoint files): a file saved in another encoding,
    or one that cannot be read, gets one clear error line instead of a traceback.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})") from err
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the text
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from err


def list_entries(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, entry) for each non-empty line of an image list that is not a `#` comment.

    The one rule for the lists test.py, the evaluation commands and NoW read; read as `read_text`.
    """
    lines = (line.strip() for line in read_text(path).splitlines())
    return [(number, line) for number, line in enumerate(lines, 1) if line and not line.startswith("#")]


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding the pixels; None if unknown.

    Lets a reader refuse an absurdly large image before decoding allocates it.
    """
    from PIL import Image  # Pillow reads headers lazily

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller judges the size
        try:
            with Image.open(path) as image:
                return image.size
        except Image.DecompressionBombError as err:  # Pillow's own limit, far above any of ours
            raise InputError(f"{path}: image is too large ({err})") from err
        except Exception:  # not a format Pillow knows, or a corrupt header: the decoder decides
            return None


def read_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file as a BGR uint8 array (H, W, 3); raise InputError naming the file.

    Images over `max_pixels` (by their header) are refused before they are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise InputError(f"{path}: {size[0]}×{size[1]} image ({size[0] * size[1] / 1e6:.0f} megapixels) is larger "
                         f"than the {max_pixels / 1e6:g}-megapixel limit; downscale it first")
    data = np.fromfile(path, dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as err:  # e.g. over CV_IO_MAX_IMAGE_PIXELS
        raise InputError(f"{path}: OpenCV cannot decode this image ({getattr(err, 'err', None) or err})") from err
    if image is None:
        raise InputError(f"{path}: not a readable image (corrupt or unsupported format)")
    return image


def write_image(path: str | os.PathLike, image_bgr: np.ndarray) -> None:
    """Write a BGR uint8 image atomically; the format follows the file extension."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", image_bgr)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the image")
    with atomic_write(path) as tmp:
        encoded.tofile(tmp)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as .npy atomically."""
    with atomic_write(path) as tmp:
        np.save(tmp, np.asarray(array))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save named arrays as a compressed .npz atomically."""
    with atomic_write(path) as tmp:
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})


REAL_KINDS = "iuf"  # numpy dtype kinds of real numbers: signed and unsigned integers, floats


def load_array(path: str | os.PathLike, shape: tuple[int | None, ...] | None = None,
               value_range: tuple[float, float] | None = None, boolean: bool = False) -> np.ndarray:
    """Load a plain .npy of real numbers (never a pickle) and check it; errors name the file.

    `shape` may contain None for free axes, e.g. (3, 112, 112) or (None, 3). With
    `value_range` (low, high) every value must also be finite and within it. Arrays of other
    dtypes (bool, complex, strings, records, dates) are refused rather than cast; with
    `boolean` the file is a mask instead: bool, or integers that are all 0 or 1, returned as bool.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable numeric .npy file ({err})") from err
    if boolean:
        if not (array.dtype == np.bool_ or (array.dtype.kind in "iu" and np.isin(array, (0, 1)).all())):
            raise InputError(f"{path}: expected a mask (bool, or integers 0 and 1), found dtype {array.dtype}"
                             f"{' with other values' if array.dtype.kind in 'iu' else ''}")
        array = array.astype(bool)
    elif array.dtype.kind not in REAL_KINDS:
        raise InputError(f"{path}: expected a numeric array, found dtype {array.dtype}")
    if shape is not None:
        ok = array.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, array.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise InputError(f"{path}: expected an array of shape {want}, found {array.shape}")
    if value_range is not None:
        check_values(path, array, *value_range)
    return array


def check_values(source: str | os.PathLike, array: np.ndarray, low: float, high: float) -> None:
    """Raise InputError naming `source` unless every value is finite and within [low, high]."""
    values = np.asarray(array, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} of {values.size} values are NaN or infinite")
    if values.size and (values.min() < low or values.max() > high):
        raise InputError(f"{source}: values span [{values.min():.4g}, {values.max():.4g}], "
                         f"expected within [{low:g}, {high:g}]")


def write_ply(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray,
              colors: np.ndarray | None = None) -> None:
    """Write a triangle mesh as binary little-endian PLY, atomically.

    vertices: (V, 3) float, faces: (F, 3) int, colors: optional (V, 3) uint8 RGB per vertex
    (`red`, `green`, `blue` properties; without them the file is the plain mesh the original
    writes, which every loader reads). Written directly (no trimesh processing) so the vertex
    order and count are exactly those of the model.
    """
    vertices = np.asarray(vertices)
    fields = [("xyz", "<f4", (3,))]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != vertices.shape or colors.dtype != np.uint8:
            raise ValueError(f"colors must be uint8 of shape {vertices.shape}, got {colors.dtype} {colors.shape}")
        fields.append(("rgb", "u1", (3,)))
    records = np.empty(len(vertices), dtype=fields)
    records["xyz"] = vertices
    if colors is not None:
        records["rgb"] = colors
    faces = np.asarray(faces)
    color_properties = "property uchar red\nproperty uchar green\nproperty uchar blue\n" if colors is not None else ""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n{color_properties}"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    face_records = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face_records["n"] = 3
    face_records["idx"] = faces
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(records.tobytes())
        handle.write(face_records.tobytes())


def write_obj(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh as Wavefront OBJ (`v` and 1-based `f` lines only), atomically.

    vertices: (V, 3) float, written with 6 decimals (1e-6 of the unit; test.py writes mm);
    faces: (F, 3) int. No normals or texture coordinates, so loaders keep the vertex order.
    """
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in np.asarray(vertices, dtype=np.float64)]
    lines += [f"f {a} {b} {c}" for a, b, c in np.asarray(faces, dtype=np.int64) + 1]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


MESH_WRITERS = {".ply": write_ply, ".obj": write_obj}


def read_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (.ply/.obj/...) without merging or reordering vertices.

    Returns vertices (V, 3) float64 and faces (F, 3) int64.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mesh file not found")
    try:
        mesh = trimesh.load(path, process=False, force="mesh")
    except Exception as err:  # trimesh raises many exception types for bad files
        raise InputError(f"{path}: not a readable mesh ({err})") from err
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
