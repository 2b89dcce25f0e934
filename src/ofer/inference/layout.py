"""Where test.py puts an image's outputs, and how to find them again (no torch: evaluation reads it).

`shapesample/<name>_0.ply`, `flamesample/<name>_0_<k>.ply`, `<name>.npz` and the files in
`<name>/` (see `ofer.inference.export`); `<name>/done.json`, written last, lists them.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from ofer.io import InputError

# The spread files of `ofer.inference.uncertainty.write_uncertainty`, inside <name>/.
UNCERTAINTY_FILES = ("uncertainty.npz", "shape_spread.ply", "expression_spread.ply",
                     "shape_spread.png", "expression_spread.png", "scores.png")
PER_IMAGE_FILES = ("kpt7.npy", "kpt68.npy", "overlay.png", "samples.png", *UNCERTAINTY_FILES)  # inside <name>/
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCFACE_INPUT_FOLDER = "arcface_input"  # the original drops this folder from output names
# Top-level names of the output folder that belong to the run, not to an image.
RESERVED_NAMES = ("shapesample", "flamesample", "report", "summary.json")


def output_name(entry: str | Path) -> str:
    """The name an entry's outputs get: the entry without its image suffix and `arcface_input/` folder.

    The entry is normalised first (`x/../a` is `a`), so two spellings of one image get one name.
    Raises InputError for an entry whose outputs would leave the output folder (absolute, or
    climbing out with `..`) or land on the run's own files (`shapesample/...`, hidden names).
    """
    text = str(entry).strip()
    if posixpath.isabs(text) or Path(text).is_absolute():
        raise InputError(f"entry '{text}' is an absolute path; list entries are relative to --imagepath")
    rel = Path(posixpath.normpath(text))
    rel = rel.with_suffix("") if rel.suffix.lower() in IMAGE_SUFFIXES else rel
    parts = [part for part in rel.parts if part != ARCFACE_INPUT_FOLDER]
    if not parts or parts == ["."]:
        raise InputError(f"entry '{text}' names no image")
    if parts[0] == "..":
        raise InputError(f"entry '{text}' leaves the image folder ('..'); its outputs would be written outside "
                         "--outputpath")
    if parts[0] in RESERVED_NAMES or any(part.startswith(".") for part in parts):
        raise InputError(f"entry '{text}' would write over the run's own files ('{parts[0]}' in the output folder); "
                         "rename the image")
    return Path(*parts).as_posix()


def done_marker(out: Path, name: str) -> Path:
    return out / name / "done.json"


def read_marker(out: Path, name: str) -> dict | None:
    """The done marker of `name`, or None when the image has no (readable) outputs."""
    try:
        marker = json.loads(done_marker(out, name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


MESH_FORMATS = {"ply": (".ply",), "obj": (".obj",), "both": (".ply", ".obj")}  # test.py --mesh-format


def expression_sample_files(out: Path, name: str) -> list[str]:
    """`flamesample/<name>_0_<k>.ply|.obj` present on disk, relative to `out`, ordered by k (.ply first).

    The pattern is exact (`<name>_0_<digits>.<suffix>`), so another image's files (`<name>_0_0_<k>.ply`
    of an image named `<name>_0`) never match.
    """
    folder = out / "flamesample" / Path(name).parent
    pattern = re.compile(rf"^{re.escape(Path(name).name)}_0_(\d+)\.(ply|obj)$")
    found = [(int(m.group(1)), m.group(2) != "ply", p.name) for p in folder.iterdir()
             if (m := pattern.match(p.name))] if folder.is_dir() else []
    return [(Path("flamesample") / Path(name).parent / file).as_posix() for *_, file in sorted(found)]


def image_files(out: Path, name: str) -> list[str]:
    """Every file of `name`'s outputs present in `out` (relative paths), the done marker excluded.

    The marker's list when it has one, plus whatever of the image's own names is on disk
    (files of a run that wrote no list, or was killed), so nothing of an earlier set is missed.
    Only paths of this image's own layout are returned, whatever a (corrupt) marker lists.
    """
    listed = (read_marker(out, name) or {}).get("files")
    listed = [f for f in listed if isinstance(f, str)] if isinstance(listed, list) else []
    named = [f"shapesample/{name}_0.ply", f"shapesample/{name}_0.obj", f"{name}.npz",
             *(f"{name}/{f}" for f in PER_IMAGE_FILES)]
    candidates = {*listed, *named, *expression_sample_files(out, name)}
    return sorted(f for f in candidates if belongs_to(name, f) and (out / f).is_file())


def belongs_to(name: str, relative: str) -> bool:
    """True when `relative` is a path of `name`'s own layout (never another image's, never outside)."""
    own = re.escape(name)
    return re.fullmatch(rf"shapesample/{own}_0\.(ply|obj)|flamesample/{own}_0_\d+\.(ply|obj)|{own}\.npz|{own}/[^/]+",
                        relative) is not None and relative != f"{name}/done.json"


def in_list_order(names: set[str] | list[str], listed: object) -> list[str]:
    """`names` in the order of test.py's list `listed` (e.g. summary.json's `listed`; anything
    but a list of names counts as no list), names it does not hold after it, sorted."""
    position = {n: i for i, n in reversed(list(enumerate(listed))) if isinstance(n, str)} \
        if isinstance(listed, list) else {}
    return sorted(names, key=lambda n: (position.get(n, len(position)), n))
