"""The offline HTML report of a test.py output folder: an index of every image and a page per
image with its pictures and an interactive 3D viewer.

`build_report(out)` reads what test.py leaves in `out` (summary.json, `<name>/done.json`,
`shapesample/`, `flamesample/`, `<name>/*.png`, `<name>/uncertainty.npz`) and writes
`<out>/report/`:

  index.html              every image: picture, status (failed ones with their reason), IdRank
                          score, mean spreads; the run's counts and settings
  images/<name>.html      the image's pictures, files and 3D viewer
  images/<name>.data.js   its meshes (float32 positions, base64) and per-vertex spreads
  assets/                 once per run: viewer.min.js (three.js), report.js (the viewer),
                          report.css, run_data.js (the mesh faces, the colour map and its scale)

The pages open from the file system with no server and no network: under file:// browsers
block fetch, XHR and ES-module imports, so every piece of data is a classic script. Pictures
and meshes are referenced from the output folder, not copied. Anything missing or unreadable
(a folder made before the spread maps existed, a deleted or corrupt file, a corrupt
summary.json) is shown as missing; the report is still written. Rebuilding from the same
folder gives byte-identical files (nothing depends on the time or the working directory).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from string import Template
from typing import Any
from urllib.parse import quote

import numpy as np

from ofer.inference.layout import in_list_order
from ofer.inference.uncertainty import SPREAD_SCALE_MM, VIRIDIS
from ofer.io import failure_reason, read_mesh

log = logging.getLogger(__name__)

REPORT_FOLDER = "report"
ASSETS = ("viewer.min.js", "report.js", "report.css")
PICTURES = (  # (file in <name>/, caption)
    ("overlay.png", "input crop (left) and the ranked shape over it"),
    ("scores.png", "IdRank scores, sorted"),
    ("shape_spread.png", "shape spread (N IdGen shapes)"),
    ("expression_spread.png", "expression spread (M expressions)"),
    ("samples.png", "neutral shape and expression samples"),
)
SPREADS = ("shape", "expression")
STATUS_CLASS = {"reconstructed": "reconstructed", "done earlier": "done", "failed": "failed",
                "not processed": "not", "outputs found": "done"}


@dataclass
class ImageEntry:
    """What the report knows of one image; `problems` and missing files are shown, never raised."""

    name: str
    status: str  # a key of STATUS_CLASS, or "unknown"
    reason: str | None = None  # why it failed or was not processed (summary.json)
    marker: dict = field(default_factory=dict)  # <name>/done.json ({} when missing)
    files: list[tuple[str, str, str | None]] = field(default_factory=list)  # (what, path in out, problem)
    meshes: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, (V, 3) float32 mm)
    faces: np.ndarray | None = None  # (F, 3) of the meshes
    spreads: dict[str, np.ndarray] = field(default_factory=dict)  # "shape" | "expression" -> (V,) mm

    def problem(self, rel: str) -> str | None:
        return next((p for _, r, p in self.files if r == rel), "missing")


def attempt(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """(value, None), or (None, why) for any error: a corrupt file can make a library raise anything."""
    try:
        return read(), None
    except Exception as err:  # noqa: BLE001 -- shown in the report as the file's problem
        return None, failure_reason(err)


def read_summary(out: Path) -> tuple[dict, str | None]:
    """summary.json as a dict ({} with the reason when it is missing or unreadable)."""
    path = out / "summary.json"
    if not path.is_file():
        return {}, "missing"
    summary, problem = attempt(lambda: json.loads(path.read_text()))
    if problem is None and not isinstance(summary, dict):
        problem = "not a JSON object"
    return (summary, None) if problem is None else ({}, f"unreadable ({problem})")


def statuses(summary: dict) -> dict[str, tuple[str, str | None]]:
    """name -> (status, reason) from summary.json's lists; wrongly typed entries are ignored."""
    found: dict[str, tuple[str, str | None]] = {}
    for key, status in (("reconstructed", "reconstructed"), ("skipped_already_done", "done earlier"),
                        ("failed", "failed"), ("not_processed", "not processed")):
        value = summary.get(key)
        items = value.items() if isinstance(value, dict) else ((n, None) for n in value) if isinstance(value, list) else ()
        for name, reason in items:
            if isinstance(name, str):
                found[name] = (status, None if reason is None else str(reason))
    return found


def discover(out: Path) -> list[str]:
    """Names of the images with a done marker (`<name>/done.json`), found by walking `out`.

    The mesh folders and hidden ones (test.py's and the report's work folders) are not entered.
    """
    names = []
    for folder, dirs, files in os.walk(out):
        rel = Path(folder).relative_to(out).as_posix()
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in ("shapesample", "flamesample") and not d.startswith(".")]
        elif "done.json" in files:
            names.append(rel)
        dirs.sort()
    return names


def safe_name(name: str) -> bool:
    """Whether a name can be a page's path under images/ (no '..', absolute path or empty part)."""
    parts = name.split("/")
    return bool(name) and "\\" not in name and "\0" not in name and all(p not in ("", ".", "..") for p in parts)


def read_vertices(path: Path, num_vertices: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float32, faces (F, 3)) of a mesh file, checked; errors say what is wrong."""
    vertices, faces = read_mesh(path)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise ValueError(f"no vertices ({vertices.shape})")
    if num_vertices is not None and len(vertices) != num_vertices:
        raise ValueError(f"{len(vertices)} vertices, the other meshes of the image have {num_vertices}")
    if not np.isfinite(vertices).all():
        raise ValueError("NaN or infinite vertices")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0 or faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError("faces missing or indexing vertices that do not exist")
    return vertices.astype(np.float32), faces


def read_spreads(path: Path, num_vertices: int | None) -> dict[str, np.ndarray]:
    """The two spread maps of uncertainty.npz, each (V,) finite and non-negative."""
    with np.load(path, allow_pickle=False) as data:
        spreads = {key: np.asarray(data[f"{key}_spread_mm"], dtype=np.float32) for key in SPREADS}
    for key, spread in spreads.items():
        if spread.ndim != 1 or (num_vertices is not None and len(spread) != num_vertices):
            raise ValueError(f"{key}_spread_mm has shape {spread.shape}, expected ({num_vertices},)")
        if not (np.isfinite(spread).all() and (spread >= 0).all()):
            raise ValueError(f"{key}_spread_mm holds negative, NaN or infinite values")
    return spreads


def check_picture(path: Path) -> None:
    """Raise unless `path` is a picture whose structure reads correctly (checked without decoding it)."""
    from PIL import Image

    with Image.open(path) as picture:
        picture.verify()


def saved_expressions(marker: dict) -> int | None:
    """How many expression meshes the image's files should hold, from its done marker (None: unknown)."""
    settings = marker.get("settings")
    saved = settings.get("num_saved_expressions") if isinstance(settings, dict) else None
    sampled = marker.get("num_expressions")
    if isinstance(saved, int) and isinstance(sampled, int):
        return min(saved, sampled)
    return None


def load_image(out: Path, name: str, status: str, reason: str | None) -> ImageEntry:
    """Everything the report shows of one image, each file read or marked with its problem."""
    entry = ImageEntry(name, status, reason)

    def note(what: str, rel: str, read: Callable[[Path], Any] | None = None) -> Any:
        path = out / rel
        if not path.is_file():
            entry.files.append((what, rel, "missing"))
            return None
        value, problem = attempt(lambda: read(path)) if read is not None else (None, None)
        entry.files.append((what, rel, None if problem is None else f"unreadable: {problem}"))
        return value

    marker = note("done marker", f"{name}/done.json", lambda p: json.loads(p.read_text()))
    entry.marker = marker if isinstance(marker, dict) else {}
    num_vertices = None
    neutral = note("ranked neutral shape", f"shapesample/{name}_0.ply", lambda p: read_vertices(p, None))
    if neutral is not None:
        entry.meshes.append(("ranked neutral shape", neutral[0]))
        entry.faces, num_vertices = neutral[1], len(neutral[0])
    expected = saved_expressions(entry.marker)
    k = 0
    while (expected is None and (out / f"flamesample/{name}_0_{k}.ply").is_file()) or (expected and k < expected):
        mesh = note(f"expression sample {k}", f"flamesample/{name}_0_{k}.ply",
                    lambda p, v=num_vertices: read_vertices(p, v))
        if mesh is not None and (entry.faces is None or np.array_equal(mesh[1], entry.faces)):
            entry.meshes.append((f"expression sample {k}", mesh[0]))
            entry.faces, num_vertices = mesh[1], len(mesh[0])
        elif mesh is not None:
            entry.files[-1] = (*entry.files[-1][:2], "unreadable: its faces differ from the neutral shape's")
        k += 1
    spreads = note("spread maps", f"{name}/uncertainty.npz", lambda p: read_spreads(p, num_vertices))
    entry.spreads = spreads or {}
    for file, caption in PICTURES:
        note(caption, f"{name}/{file}", check_picture)
    for what, rel in (("all samples and scores", f"{name}.npz"), ("NoW landmarks", f"{name}/kpt7.npy"),
                      ("shape spread mesh (vertex colours)", f"{name}/shape_spread.ply"),
                      ("expression spread mesh (vertex colours)", f"{name}/expression_spread.ply")):
        note(what, rel)
    return entry


# ----------------------------------------------------------------------------- writing


def e(value: Any) -> str:
    """HTML-escaped text (element content and attribute values alike)."""
    return html.escape(str(value), quote=True)


def href(prefix: str, rel: str) -> str:
    """An escaped relative URL: `prefix` (../ steps) then the path `rel`, percent-encoded."""
    return e(prefix + quote(rel))


def b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def faces_data(faces: np.ndarray) -> dict:
    """Faces for the viewer: uint16 indices when they fit (half the size), else uint32."""
    dtype = "uint16" if faces.max() < 2**16 else "uint32"
    return {"dtype": dtype, "data": b64(faces, "<u2" if dtype == "uint16" else "<u4")}


def template(name: str) -> Template:
    return Template((resources.files(__name__) / "templates" / name).read_text(encoding="utf-8"))


def fmt(value: Any, spec: str = ".3g", unit: str = "") -> str:
    """A number as text, or a dash when there is none."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    return f"{value:{spec}}{unit}" if ok else "&ndash;"


def status_html(entry: ImageEntry) -> str:
    css = STATUS_CLASS.get(entry.status, "not")
    text = f'<span class="status-{css}">{e(entry.status)}</span>'
    return text + (f'<div class="reason">{e(entry.reason)}</div>' if entry.reason else "")


def mean_spread(entry: ImageEntry, key: str) -> float | None:
    return float(entry.spreads[key].mean()) if key in entry.spreads else None


def legend_html() -> str:
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in VIRIDIS)
    return (f'<span>0</span><span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
            f"<span>{SPREAD_SCALE_MM:g} mm and above (the same scale for every image and both maps)</span>")


def write_index(folder: Path, out: Path, entries: list[ImageEntry], summary: dict, summary_problem: str | None) -> None:
    rows = []
    for entry in entries:
        page = f"images/{entry.name}.html"
        overlay = f"{entry.name}/overlay.png"
        thumb = (f'<img class="thumb" src="{href("../", overlay)}" alt="overlay of {e(entry.name)}">'
                 if entry.problem(overlay) is None else '<span class="missing">no picture</span>')
        if safe_name(entry.name):
            link = f'<a href="{href("", page)}">{e(entry.name)}</a>'
            thumb = f'<a href="{href("", page)}">{thumb}</a>'
        else:
            link = f'{e(entry.name)}<div class="reason">no page: the name is not a usable path</div>'

        rows.append(f"<tr><td>{thumb}</td><td>{link}</td><td>{status_html(entry)}</td>"
                    f'<td class="num">{fmt(entry.marker.get("best_score"))}</td>'
                    f'<td class="num">{fmt(mean_spread(entry, "shape"), ".2f", " mm")}</td>'
                    f'<td class="num">{fmt(mean_spread(entry, "expression"), ".2f", " mm")}</td></tr>')
    if summary_problem is not None:
        run = f'<p class="missing">summary.json: {e(summary_problem)}; images found from their done markers.</p>'
    else:
        listed = [status for status, _ in statuses(summary).values()]
        counts = ", ".join(f"{listed.count(s)} {s}" for s in ("reconstructed", "done earlier", "failed", "not processed"))
        facts = [counts, f"device {summary.get('device', '?')}", f"{summary.get('seconds_per_image', '?')} s per image",
                 f"{summary.get('world_size', '?')} process(es)"]
        if summary.get("interrupted"):
            facts.append("interrupted")
        notes = "".join(f'<p class="note">{e(n)}</p>' for n in summary.get("notes") or [] if isinstance(n, str))
        run = f"<p>{e('; '.join(str(f) for f in facts))}</p>{notes}"
    settings = summary.get("settings")
    settings_html = ""
    if isinstance(settings, dict):
        cells = "".join(f"<tr><td>{e(k)}</td><td>{e(json.dumps(v, sort_keys=True))}</td></tr>"
                        for k, v in sorted(settings.items()))
        settings_html = f'<h2>Settings of the run</h2><table class="settings">{cells}</table>'
    text = template("index.html").substitute(title=e(out.resolve().name), run=run, count=len(entries),
                                             rows="\n".join(rows), settings=settings_html)
    (folder / "index.html").write_text(text, encoding="utf-8")


def write_image_page(folder: Path, entry: ImageEntry, run_faces: np.ndarray | None) -> None:
    """images/<name>.html and images/<name>.data.js."""
    depth = entry.name.count("/")
    to_report, to_out = "../" * (depth + 1), "../" * (depth + 2)
    data = {
        "name": entry.name,
        "faces": None if entry.faces is None or (run_faces is not None and np.array_equal(entry.faces, run_faces))
        else faces_data(entry.faces),
        "meshes": [{"label": label, "positions": b64(v, "<f4")} for label, v in entry.meshes],
        "spreads": {key: b64(entry.spreads[key], "<f4") if key in entry.spreads else None for key in SPREADS},
    }
    base = folder / "images" / entry.name
    base.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{base}.data.js").write_text(f"window.OFER_IMAGE = {json.dumps(data)};\n", encoding="ascii")
    pictures = []
    for file, caption in PICTURES:
        rel = f"{entry.name}/{file}"
        problem = entry.problem(rel)
        body = (f'<img src="{href(to_out, rel)}" alt="{e(caption)}">' if problem is None
                else f'<div class="missing">{e(file)}: {e(problem)}</div>')
        pictures.append(f"<figure>{body}<figcaption>{e(caption)}</figcaption></figure>")
    files = "\n".join(f'<tr><td>{e(what)}</td><td><a href="{href(to_out, rel)}"><code>{e(rel)}</code></a></td>'
                      f'<td class="{"missing" if problem else ""}">{e(problem or "ok")}</td></tr>'
                      for what, rel, problem in entry.files)
    counts = {key: entry.marker.get(f"num_{key}s", letter) for key, letter in (("shape", "N"), ("expression", "M"))}
    text = template("image.html").substitute(
        name=e(entry.name), status=status_html(entry), assets=e(to_report + "assets/"), index=e(to_report + "index.html"),
        data=href("", PurePosixPath(entry.name).name + ".data.js"), legend=legend_html(), pictures="\n".join(pictures),
        files=files, num_shapes=e(counts["shape"]), num_expressions=e(counts["expression"]))
    Path(f"{base}.html").write_text(text, encoding="utf-8")


def report_folder(out: Path, names: list[str]) -> Path:
    """`<out>/report`, or `<out>/ofer_report` when an image's own outputs live in `<out>/report/`."""
    taken = any(n == REPORT_FOLDER or n.startswith(REPORT_FOLDER + "/") for n in names)
    if taken:
        log.warning("an image is named %r: the report goes to %s instead", REPORT_FOLDER, out / "ofer_report")
    return out / ("ofer_report" if taken else REPORT_FOLDER)


def build_report(out: str | os.PathLike) -> Path:
    """Write the report of the test.py output folder `out` (see the module docstring); return its index.html.

    The report is built in a temporary folder inside `out` and then put in place of the old one,
    so a reader never sees half of it. Raises OSError only when `out` cannot be written.
    """
    out = Path(out)
    summary, summary_problem = read_summary(out)
    known = statuses(summary)
    names = in_list_order(set(known) | set(discover(out)), summary.get("listed"))
    entries = [load_image(out, n, *known.get(n, ("outputs found", None))) if safe_name(n)
               else ImageEntry(n, *known.get(n, ("unknown", None))) for n in names]
    run_faces = next((entry.faces for entry in entries if entry.faces is not None), None)
    target = report_folder(out, names)
    for stale in out.glob(".report-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=out, prefix=".report-"))
    try:
        os.chmod(work, 0o755)
        (work / "assets").mkdir()
        for asset in ASSETS:
            (work / "assets" / asset).write_bytes((resources.files(__name__) / "assets" / asset).read_bytes())
        run_data = {"faces": None if run_faces is None else faces_data(run_faces),
                    "colormap": VIRIDIS.astype(int).tolist(), "scale_mm": SPREAD_SCALE_MM}
        (work / "assets" / "run_data.js").write_text(f"window.OFER_RUN = {json.dumps(run_data)};\n", encoding="ascii")
        write_index(work, out, entries, summary, summary_problem)
        for entry in entries:
            if safe_name(entry.name):
                write_image_page(work, entry, run_faces)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=out, prefix=".report-old-"))
            os.replace(target, old / "report")
        os.replace(work, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target / "index.html"
