"""Write one image's reconstruction to disk: original files, parameters, landmarks, pictures.

Layout under the output folder (SPEC §11, ours added):
  shapesample/<name>_0.ply           best-ranked neutral shape (mm), as the original (.obj too, or
                                     instead, with mesh_format "both" or "obj")
  flamesample/<name>_0_<k>.ply       expression samples k < test.num_saved_expressions (mm)
  <name>.npz                         all sampled shapes, scores, expressions, jaws, the pick
  <name>/kpt7.npy, <name>/kpt68.npy  3D landmarks of the neutral shape (mm), for NoW
  <name>/overlay.png                 the best shape drawn over the aligned input crop
  <name>/samples.png                 contact sheet of the expression samples
  <name>/uncertainty.npz, ...        per-vertex spread of the samples, its coloured meshes and pictures
                                     (`ofer.inference.uncertainty.UNCERTAINTY_FILES`)
  <name>/done.json                   written last, listing the files: a re-run skips images that have it
`<name>` comes from the list entry (`ofer.inference.cli.output_name`); the index is always 0, as
in the original's names (its `--numcheckpoint` counts checkpoints and never enters a name).

An image's files become visible together or not at all: they are written into a private
staging folder (`<out>/<name>/.staging-*`) and moved into place only when all of them were
written; an earlier set of the same image (its done marker first) is removed just before, so
an overwrite never mixes old and new files and leaves no stale expression samples behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ofer.inference.layout import MESH_FORMATS, UNCERTAINTY_FILES, done_marker, image_files
from ofer.inference.pictures import overlay_picture, samples_sheet
from ofer.inference.pipeline import Reconstruction
from ofer.inference.uncertainty import write_uncertainty
from ofer.io import MESH_WRITERS, WriteError, atomic_write, save_npy, save_npz, write_image

log = logging.getLogger(__name__)
STAGING_PREFIX = ".staging-"  # inside <name>/; never a list entry's name (hidden names are refused)


def remove_outputs(out: Path, name: str) -> None:
    """Remove an image's earlier outputs, its done marker first (so it never looks done meanwhile)."""
    files = image_files(out, name)
    done_marker(out, name).unlink(missing_ok=True)
    for relative in files:
        (out / relative).unlink(missing_ok=True)


def _write_files(root: Path, name: str, rec: Reconstruction, faces: np.ndarray, arcface: np.ndarray,
                 num_saved: int, mesh_format: str) -> list[str]:
    """Write the image's files under `root` (the staging folder); return their paths relative to it.

    The pictures are drawn before any file is written, so a failure there writes nothing.
    """
    overlay, sheet = overlay_picture(arcface, rec, faces), samples_sheet(rec, faces, min(num_saved, 11))
    files = []

    def path(relative: str) -> Path:
        files.append(relative)
        return root / relative

    for suffix in MESH_FORMATS[mesh_format]:
        write_mesh = MESH_WRITERS[suffix]
        write_mesh(path(f"shapesample/{name}_0{suffix}"), rec.neutral_mm, faces)
        for k in range(min(num_saved, len(rec.expression_mm))):
            write_mesh(path(f"flamesample/{name}_0_{k}{suffix}"), rec.expression_mm[k], faces)
    save_npz(path(f"{name}.npz"), shapes=rec.shapes, scores=rec.scores, best=np.int64(rec.best),
             expressions=rec.expressions, jaws=rec.jaws)
    save_npy(path(f"{name}/kpt7.npy"), rec.kpt7_mm)
    save_npy(path(f"{name}/kpt68.npy"), rec.kpt68_mm)
    write_image(path(f"{name}/overlay.png"), overlay)
    write_image(path(f"{name}/samples.png"), sheet)
    write_uncertainty(root / name, rec, faces)
    files += [f"{name}/{file}" for file in UNCERTAINTY_FILES]
    return files


def write_outputs(out: Path, name: str, rec: Reconstruction, faces: np.ndarray, arcface: np.ndarray,
                  num_saved: int, provenance: dict | None = None, mesh_format: str = "ply") -> dict:
    """Write every file of one image, all visible together or none; return its done marker.

    Files are staged in `<out>/.partial/`, then an earlier set of the image is removed (marker
    first), the new files are moved into place and the marker, listing them, is written last.
    A failure while staging (e.g. a full disk) leaves the earlier set as it was.
    `provenance` (test.py: the settings and the run that made the files) goes into the marker.
    `mesh_format` (`ply`, `obj` or `both`): the meshes' file formats (test.py's --mesh-format).
    """
    if mesh_format not in MESH_FORMATS:
        raise ValueError(f"mesh_format must be one of {', '.join(MESH_FORMATS)}, got {mesh_format!r}")
    folder = out / name
    remove_staging(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX))
    moved: list[Path] = []
    try:
        files = _write_files(staging, name, rec, faces, arcface, num_saved, mesh_format)
        remove_outputs(out, name)
        for relative in files:
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, target)
            moved.append(target)
        marker = {
            "name": name,
            "best_sample": rec.best,
            "num_shapes": len(rec.shapes),
            "num_expressions": len(rec.expressions),
            "best_score": float(rec.scores[rec.best]),
            "files": files,
            **(provenance or {}),
        }
        with atomic_write(done_marker(out, name)) as tmp:
            tmp.write_text(json.dumps(marker, indent=2))
    except BaseException as err:
        for target in moved:  # a set is visible whole or not at all
            target.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(f"{out}: the outputs of {name} could not be moved into place ({err})") from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(folder, out)
    return marker


def remove_staging(folder: Path) -> None:
    """Remove the staging folders a killed write left in an image's folder (one process writes an image)."""
    for stale in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _remove_empty_folders(folder: Path, out: Path) -> None:
    """Remove `folder` and its parents below `out` while they are empty (a failed image leaves none)."""
    while folder != out and out in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): done
            return
        folder = folder.parent
