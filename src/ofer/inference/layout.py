"""Where test.py puts an image's outputs, and how to find them again (no torch: evaluation reads it).

`shapesample/<name>_0.ply`, `flamesample/<name>_0_<k>.ply`, `<name>.npz` and the files in
`<name>/` (see `ofer.inference.export`); `<name>/done.json`, written last, lists them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PER_IMAGE_FILES = ("kpt7.npy", "kpt68.npy", "overlay.png", "samples.png")  # inside <name>/


def done_marker(out: Path, name: str) -> Path:
    return out / name / "done.json"


def read_marker(out: Path, name: str) -> dict | None:
    """The done marker of `name`, or None when the image has no (readable) outputs."""
    try:
        marker = json.loads(done_marker(out, name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def expression_sample_files(out: Path, name: str) -> list[str]:
    """`flamesample/<name>_0_<k>.ply` present on disk, relative to `out`, ordered by k.

    The pattern is exact (`<name>_0_<digits>.ply`), so another image's files (`<name>_0_0_<k>.ply`
    of an image named `<name>_0`) never match.
    """
    folder = out / "flamesample" / Path(name).parent
    pattern = re.compile(rf"^{re.escape(Path(name).name)}_0_(\d+)\.ply$")
    found = [(int(m.group(1)), p.name) for p in folder.glob("*.ply") if (m := pattern.match(p.name))] \
        if folder.is_dir() else []
    return [(Path("flamesample") / Path(name).parent / file).as_posix() for _, file in sorted(found)]


def image_files(out: Path, name: str) -> list[str]:
    """Every file of `name`'s outputs present in `out` (relative paths), the done marker excluded.

    The marker's list when it has one, plus whatever of the image's own names is on disk
    (files of a run that wrote no list, or was killed), so nothing of an earlier set is missed.
    Only paths of this image's own layout are returned, whatever a (corrupt) marker lists.
    """
    listed = (read_marker(out, name) or {}).get("files")
    listed = [f for f in listed if isinstance(f, str)] if isinstance(listed, list) else []
    named = [f"shapesample/{name}_0.ply", f"{name}.npz", *(f"{name}/{f}" for f in PER_IMAGE_FILES)]
    candidates = {*listed, *named, *expression_sample_files(out, name)}
    return sorted(f for f in candidates if belongs_to(name, f) and (out / f).is_file())


def belongs_to(name: str, relative: str) -> bool:
    """True when `relative` is a path of `name`'s own layout (never another image's, never outside)."""
    own = re.escape(name)
    return re.fullmatch(rf"shapesample/{own}_0\.ply|flamesample/{own}_0_\d+\.ply|{own}\.npz|{own}/[^/]+",
                        relative) is not None and relative != f"{name}/done.json"
