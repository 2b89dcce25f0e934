"""Write one image's reconstruction to disk: original files, parameters, landmarks, pictures.

Layout under the output folder (SPEC §11, ours added):
  shapesample/<name>_0.ply           best-ranked neutral shape (mm), as the original
  flamesample/<name>_0_<k>.ply       expression samples k < test.num_saved_expressions (mm)
  <name>.npz                         all sampled shapes, scores, expressions, jaws, the pick
  <name>/kpt7.npy, <name>/kpt68.npy  3D landmarks of the neutral shape (mm), for NoW
  <name>/overlay.png                 the best shape drawn over the aligned input crop
  <name>/samples.png                 contact sheet of the expression samples
  <name>/done.json                   written last: a re-run skips images that have it
`<name>` comes from the list entry (`ofer.inference.cli.output_name`); the index is always 0, as
in the original's names (its `--numcheckpoint` counts checkpoints and never enters a name).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ofer.inference.pictures import overlay_picture, samples_sheet
from ofer.inference.pipeline import Reconstruction
from ofer.io import atomic_write, save_npy, save_npz, write_image, write_ply


def done_marker(out: Path, name: str) -> Path:
    return out / name / "done.json"


def write_outputs(out: Path, name: str, rec: Reconstruction, faces: np.ndarray, arcface: np.ndarray,
                  num_saved: int, provenance: dict | None = None) -> dict:
    """Write every file of one image (each atomically), the done marker last; return its summary.

    The pictures are drawn before any file is written, so a failure there writes nothing.
    `provenance` (test.py: the settings and the run that made the files) goes into the marker.
    """
    overlay, sheet = overlay_picture(arcface, rec, faces), samples_sheet(rec, faces, min(num_saved, 11))
    write_ply(out / "shapesample" / f"{name}_0.ply", rec.neutral_mm, faces)
    for k in range(min(num_saved, len(rec.expression_mm))):
        write_ply(out / "flamesample" / f"{name}_0_{k}.ply", rec.expression_mm[k], faces)
    save_npz(out / f"{name}.npz", shapes=rec.shapes, scores=rec.scores, best=np.int64(rec.best),
             expressions=rec.expressions, jaws=rec.jaws)
    save_npy(out / name / "kpt7.npy", rec.kpt7_mm)
    save_npy(out / name / "kpt68.npy", rec.kpt68_mm)
    write_image(out / name / "overlay.png", overlay)
    write_image(out / name / "samples.png", sheet)
    summary = {
        "name": name,
        "best_sample": rec.best,
        "num_shapes": len(rec.shapes),
        "num_expressions": len(rec.expressions),
        "best_score": float(rec.scores[rec.best]),
        **(provenance or {}),
    }
    with atomic_write(done_marker(out, name)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
