"""Scan points exactly as stored: every vertex of an .obj or .ply scan, in file order.

The NoW reference crops and measures a scan's vertices as its file lists them. Mesh loaders
(trimesh, by default and with `process=False` alike) split a vertex where texture coordinates
meet at a seam (OBJ `f v/vt/vn` faces, PLY per-face `texcoord`) and drop vertices no face
uses, so the cropped point set would differ. These readers take the `v` lines of an OBJ and
the `vertex` element of a PLY (ASCII or binary) and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ofer.io import InputError

# PLY scalar types -> numpy (both the PLY 1.0 names and the sized ones).
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


def read_obj_vertices(path: Path) -> np.ndarray:
    """The `v x y z [...]` lines of an OBJ file, (N, 3) float64 in file order; errors name the line."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            tokens = line.split()
            if tokens and tokens[0] == "v":
                try:
                    rows.append([float(x) for x in tokens[1:4]])
                except ValueError as err:
                    raise InputError(f"{path}, line {number}: not a vertex line ({err})") from err
                if len(rows[-1]) != 3:
                    raise InputError(f"{path}, line {number}: a vertex needs 3 coordinates, found {len(rows[-1])}")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _ply_header(path: Path, file) -> tuple[str | None, list[tuple[str, int, list[tuple[str, str]]]]]:
    """(byte order or None for ASCII, [(element, count, [(property, type)])]) of a PLY header."""
    if file.readline().strip() != b"ply":
        raise InputError(f"{path}: not a PLY file (no 'ply' magic line)")
    order, elements = "missing", []
    for line in file:
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        try:
            if words[0] == "format":
                order = _PLY_FORMATS[words[1]]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property":
                kind = "list" if words[1] == "list" else _PLY_TYPES[words[1]]
                elements[-1][2].append((words[-1], kind))
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"{path}: unreadable PLY header line {line.strip()!r}") from err
    else:
        raise InputError(f"{path}: PLY header without end_header")
    if order == "missing":
        raise InputError(f"{path}: PLY header without a format line")
    return order, elements


def read_ply_vertices(path: Path) -> np.ndarray:
    """The x, y, z of a PLY file's `vertex` element, (N, 3) float64 in file order.

    The vertex element must come first (as every writer we know puts it) and hold scalar
    properties only.
    """
    with open(path, "rb") as file:
        order, elements = _ply_header(path, file)
        if not elements or elements[0][0] != "vertex":
            raise InputError(f"{path}: the PLY's first element is not 'vertex' (not supported for scans)")
        _, count, properties = elements[0]
        names = [name for name, _ in properties]
        if any(kind == "list" for _, kind in properties) or not {"x", "y", "z"} <= set(names):
            raise InputError(f"{path}: the PLY vertex element needs scalar x, y, z properties, found {names}")
        if order is None:  # ASCII: the first `count` lines after the header
            lines = [file.readline().split() for _ in range(count)]
            try:
                table = np.array([[float(v) for v in words[: len(names)]] for words in lines], dtype=np.float64)
            except ValueError as err:
                raise InputError(f"{path}: unreadable PLY vertex line ({err})") from err
            if table.shape != (count, len(names)):
                raise InputError(f"{path}: the PLY declares {count} vertices of {len(names)} values; "
                                 "the file holds fewer")
            return table[:, [names.index(axis) for axis in "xyz"]]
        dtype = np.dtype([(name, order + kind) for name, kind in properties])
        data = file.read(count * dtype.itemsize)
        if len(data) < count * dtype.itemsize:
            raise InputError(f"{path}: the PLY declares {count} vertices; the file is shorter")
        table = np.frombuffer(data, dtype=dtype, count=count)
        return np.stack([table[axis].astype(np.float64) for axis in "xyz"], axis=1)


def read_scan_vertices(path: str | os.PathLike) -> np.ndarray:
    """Every vertex of a scan (N, 3) float64 as stored, in file order (.obj or .ply).

    Raises InputError naming the file for a missing or unreadable file, one without
    vertices, or non-finite coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scan not found")
    suffix = path.suffix.lower()
    if suffix not in (".obj", ".ply"):
        raise InputError(f"{path}: scans are read from .obj or .ply files")
    vertices = read_obj_vertices(path) if suffix == ".obj" else read_ply_vertices(path)
    if len(vertices) == 0:
        raise InputError(f"{path}: the scan has no vertices")
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} of {len(vertices)} scan vertices are NaN or infinite "
                         f"(the first is vertex {int(np.argmax(bad)) + 1})")
    return vertices
