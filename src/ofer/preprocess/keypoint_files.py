"""Keypoint files: 5 facial keypoints (and optionally a face box) per image, given by the user.

The path without a detector: keypoints measured by hand or by another tool, in JSON or text.
Every error names the file and the line (or JSON entry).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ofer.io import InputError, read_text
from ofer.preprocess.alignment import check_box, check_points


@dataclass
class KeypointEntry:
    """Keypoints (5, 2) of one image and, when given, its face box (4,)."""

    kps5: np.ndarray
    box: np.ndarray | None


def _entry(path: Path, where: str, kps: object, box: object) -> KeypointEntry:
    """Validate one keypoint record; errors name the file and `where` (line or entry)."""
    try:
        kps5 = check_points(np.asarray(kps, dtype=np.float64), "keypoints", 5)
        checked_box = None if box is None else check_box(np.asarray(box, dtype=np.float64))
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}, {where}: {err}") from err
    return KeypointEntry(kps5, checked_box)


def _load_keypoints_json(path: Path, text: str) -> dict[str, KeypointEntry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise InputError(f'{path}: expected a JSON object mapping image names to {{"kps": ..., "box": ...}}')
    table = {}
    for name, record in data.items():
        if not isinstance(record, dict) or "kps" not in record:
            raise InputError(
                f'{path}, entry {name!r}: expected an object with key "kps" (and optionally "box")'
            )
        unknown = set(record) - {"kps", "box"}
        if unknown:
            raise InputError(f"{path}, entry {name!r}: unknown keys {sorted(unknown)} (allowed: kps, box)")
        table[name] = _entry(path, f"entry {name!r}", record["kps"], record.get("box"))
    return table


def _load_keypoints_txt(path: Path, text: str) -> dict[str, KeypointEntry]:
    table: dict[str, KeypointEntry] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        name, values = tokens[0], tokens[1:]
        if len(values) not in (10, 14):
            raise InputError(
                f"{path}, line {number}: expected 'name x1 y1 ... x5 y5 [bx1 by1 bx2 by2]' "
                f"(10 or 14 numbers after the name), found {len(values)}"
            )
        try:
            numbers = [float(v) for v in values]
        except ValueError as err:
            raise InputError(f"{path}, line {number}: {err}") from err
        if name in table:
            raise InputError(f"{path}, line {number}: {name!r} already given on line {first_line[name]}")
        first_line[name] = number
        box = numbers[10:] or None
        table[name] = _entry(path, f"line {number}", np.reshape(numbers[:10], (5, 2)), box)
    return table


def load_keypoints(path: str | os.PathLike) -> dict[str, KeypointEntry]:
    """Read a keypoint file: image name (relative path or stem) -> KeypointEntry.

    Formats (chosen by extension):
      - `.json`: {"name": {"kps": [[x, y] × 5], "box": [x1, y1, x2, y2]}, ...}, box optional;
      - anything else, text: one image per line `name x1 y1 ... x5 y5 [bx1 by1 bx2 by2]`,
        blank lines and `#` comments ignored (names cannot contain spaces).
    Keypoint order: left eye, right eye, nose tip, left mouth corner, right mouth corner.
    Errors name the file and the line (or JSON entry).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: keypoint file not found")
    text = read_text(path)
    loader = _load_keypoints_json if path.suffix.lower() == ".json" else _load_keypoints_txt
    table = loader(path, text)
    if not table:
        raise InputError(f"{path}: no keypoint entries")
    return table


def lookup_keypoints(table: dict[str, KeypointEntry], relative_path: str) -> KeypointEntry | None:
    """Find an image's entry by relative path, path without suffix, file name or stem."""
    rel = Path(relative_path)
    for key in (rel.as_posix(), rel.with_suffix("").as_posix(), rel.name, rel.stem):
        if key in table:
            return table[key]
    return None
