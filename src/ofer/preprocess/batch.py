"""Preprocess a folder of photos: one guarded step per photo, a report that is always written.

For each photo: read it (refusing, from the file header alone, one too large to decode
safely), find its face (a detector or a keypoint file), check that the face lies in the
photo, and only then write `<out>/<name>.jpg` (224 FaRL crop) and `<out>/<name>.npy` (ArcFace
input). Any failure of one photo, whatever raised it, is recorded in
`<out>/preprocess_report.json` with the reason, its files are removed, and the run goes on.
The report and `<out>/list.txt` (the names processed) are written at the end, also when the
run is interrupted (Ctrl-C, SIGTERM) or stopped by an unexpected error.

Input files are never written, replaced or deleted: an output folder holding any input (a
photo, the list file, the keypoint file) is refused before any work, whatever form `--input`
takes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from ofer.encoders.normalise import ARCFACE_SIZE, FARL_SIZE
from ofer.io import (
    InputError,
    OutputFolderError,
    atomic_write,
    check_output_folder,
    failure_reason,
    read_image,
    read_text,
    save_npy,
    write_image,
)
from ofer.preprocess.crops import PreparedFace, inside_fraction, prepare_face
from ofer.preprocess.detectors import DEFAULT_DETECTOR, Detector, make_detector, pick_face, plausible_faces
from ofer.preprocess.keypoint_files import KeypointEntry, load_keypoints, lookup_keypoints
from ofer.progress import progress

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Largest photo decoded (pixels): above a 108-megapixel phone photo, below what exhausts memory.
MAX_IMAGE_PIXELS = 120_000_000
# Smallest share of each crop that must come from the photo rather than the black border.
MIN_INSIDE_FRACTION = 0.5
KEYPOINT_NAMES = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, raised once the report (`.report`) is written."""

    def __init__(self, report: dict):
        super().__init__("interrupted")
        self.report = report


def list_images(input_path: Path) -> list[tuple[Path, str]]:
    """(image path, path relative to the input as given) for a folder, one image or a list file.

    A folder is scanned (not recursively) for image suffixes; a text list file names one image
    per line, relative to the list file's folder unless absolute.
    """
    if input_path.is_dir():
        return [
            (p, p.name) for p in sorted(input_path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not input_path.is_file():
        raise InputError(f"{input_path}: input folder or list file not found")
    if input_path.suffix.lower() in IMAGE_SUFFIXES:
        return [(input_path, input_path.name)]
    try:
        lines = read_text(input_path).splitlines()
    except InputError as err:
        raise InputError(f"{err}; --input takes a folder, an image ({', '.join(IMAGE_SUFFIXES)}) "
                         "or a UTF-8 text file listing images") from err
    images = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry)
            images.append((path if path.is_absolute() else input_path.parent / path, entry))
    return images


def check_inputs_outside(out_dir: Path, inputs: list[Path]) -> None:
    """Refuse an output folder that holds any of the input files (before any work).

    Preprocessing writes `<name>.jpg`, `<name>.npy`, `list.txt` and `preprocess_report.json`
    into `out_dir` and removes a failed photo's two files there, so an input in that folder
    could be replaced or deleted; the same folder reached through a link counts too.
    """
    out_resolved = out_dir.resolve()
    out_stat = out_dir.stat() if out_dir.is_dir() else None
    clashes = []
    for path in inputs:
        folder = path.parent
        same = folder.resolve() == out_resolved or (
            out_stat is not None and folder.is_dir() and os.path.samestat(folder.stat(), out_stat)
        )
        if same:
            clashes.append(path)
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise InputError(
            f"{out_dir}: the output folder holds input files ({clashes[0].name}{more}), which preprocessing "
            "could overwrite or delete; choose an --out folder that holds none of the inputs"
        )


def check_face_in_photo(face: PreparedFace, image_shape: tuple[int, ...]) -> None:
    """Refuse keypoints outside the photo and crops mostly outside it (they would be black)."""
    height, width = image_shape[:2]
    outside = [
        f"{name} at ({x:.1f}, {y:.1f})"
        for name, (x, y) in zip(KEYPOINT_NAMES, face.kps5)
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1)
    ]
    if outside:
        raise InputError(f"keypoints outside the {width}×{height} photo: {', '.join(outside)}")
    for label, matrix, size in (("224 FaRL", face.m224, FARL_SIZE), ("112 ArcFace", face.m112, ARCFACE_SIZE)):
        inside = inside_fraction(matrix, size, image_shape)
        if inside < MIN_INSIDE_FRACTION:
            raise InputError(
                f"the {label} crop lies {100 * (1 - inside):.0f}% outside the {width}×{height} photo "
                f"(at most {100 * (1 - MIN_INSIDE_FRACTION):.0f}% allowed): face box or keypoints are off the photo"
            )


def _box_area(box: np.ndarray) -> float:
    return float(np.prod(np.maximum(box[2:] - box[:2], 0.0)))


def _find_face(
    image: np.ndarray, relative: str, keypoints: dict[str, KeypointEntry] | None, detector: Detector | None,
    min_score: float,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Keypoints (5, 2) and box (4,) or None of the face to crop, and what the report says of the choice.

    With a detector the report gets the score of the face taken, how many faces scored at
    least `min_score` and the others' boxes and scores; several plausible faces, or a larger
    one passed over for a more confident one, are warned about.
    """
    if keypoints is not None:
        entry = lookup_keypoints(keypoints, relative)
        if entry is None:
            raise InputError(f"no keypoints for {relative!r} in the keypoint file")
        return entry.kps5, entry.box, {}
    boxes, scores, kps = detector.detect(image)
    index = pick_face(boxes, scores, kps, image.shape, min_score)
    if index is None:
        raise InputError(f"no face found (detections: {len(scores)}, min score {min_score})")
    others = [i for i in np.flatnonzero(np.asarray(scores) >= min_score) if i != index]
    plausible = set(plausible_faces(scores, min_score).tolist())
    doubtful = [i for i in others if i in plausible or _box_area(boxes[i]) > _box_area(boxes[index])]
    if doubtful:
        logger.warning(
            "%s: %d faces found; took the one at %s (score %.3f) by the rule 'confident, then large, then central'; "
            "also plausible: %s", relative, len(others) + 1, np.round(boxes[index]).astype(int).tolist(),
            scores[index], ", ".join(f"{np.round(boxes[i]).astype(int).tolist()} (score {scores[i]:.3f})"
                                     for i in doubtful),
        )
    choice = {
        "score": round(float(scores[index]), 4),
        "faces_found": len(others) + 1,
        "other_faces": [{"box": np.round(boxes[i], 2).tolist(), "score": round(float(scores[i]), 4)} for i in others],
    }
    return kps[index], boxes[index], choice


def crop_photo(
    image: np.ndarray,
    relative: str,
    keypoints: dict[str, KeypointEntry] | None,
    detector: Detector | None,
    min_score: float = 0.5,
) -> tuple[PreparedFace, dict]:
    """Find the face of one decoded photo (BGR) and make both crops, writing nothing.

    Returns the crops and the report entry's description of them (box, keypoints, the choice
    among the faces found). Raises InputError when no face is found or the crop is off the photo.
    """
    kps5, box, choice = _find_face(image, relative, keypoints, detector, min_score)
    face = prepare_face(image, kps5, box)
    check_face_in_photo(face, image.shape)
    return face, {"box": face.box.round(2).tolist(), "kps5": face.kps5.round(2).tolist(),
                  "box_estimated": box is None, **choice}


def process_image(
    image_path: Path,
    relative: str,
    out_dir: Path,
    keypoints: dict[str, KeypointEntry] | None,
    detector: Detector | None,
    min_score: float = 0.5,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """Crop one photo, write `<name>.jpg` and `<name>.npy`; return its report entry."""
    face, described = crop_photo(read_image(image_path, max_pixels), relative, keypoints, detector, min_score)
    name = Path(relative).stem
    save_npy(out_dir / f"{name}.npy", face.arcface)
    write_image(out_dir / f"{name}.jpg", face.crop224)
    return {"image": str(image_path), "name": name, **described}


def _remove_outputs(out_dir: Path, name: str) -> None:
    for suffix in (".jpg", ".npy"):
        (out_dir / f"{name}{suffix}").unlink(missing_ok=True)


def _write_report(out_dir: Path, report: dict) -> None:
    with atomic_write(out_dir / "preprocess_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with atomic_write(out_dir / "list.txt") as tmp:
        tmp.write_text("".join(f"{item['name']}\n" for item in report["processed"]), encoding="utf-8")


def run(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    detector: str | Detector | None = None,
    keypoints: str | os.PathLike | dict[str, KeypointEntry] | None = None,
    min_score: float = 0.5,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """Preprocess every photo of a folder, a list file or one image; return the report.

    Args:
        input_path: folder of photos, one photo, or a text file listing photos.
        out_dir: where `<name>.jpg`, `<name>.npy`, `list.txt` and `preprocess_report.json` go.
        detector: a detector name ("mtcnn", the default, or "scrfd") or a detector object;
            not used with `keypoints`.
        keypoints: a keypoint file (or a table from `load_keypoints`) instead of a detector.
        min_score: detections scoring below it are ignored.
        max_pixels: larger photos are refused from their header.
    Returns:
        {"input", "detector", "processed": [...], "failed": [{"image", "reason"}],
         "interrupted": bool, "not_attempted": int}; also written to the output folder. With a
        detector, each processed entry also holds the face's "score", "faces_found" (detections
        scoring at least `min_score`) and "other_faces" (their boxes and scores).
    Raises:
        InputError (before any photo is processed) for a missing or empty input, an output
        folder that cannot be written or that holds an input file, or a bad keypoint file.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    if keypoints is not None and detector is not None:
        raise ValueError("give a detector or keypoints, not both")
    images = list_images(input_path)
    if not images:
        raise InputError(f"{input_path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    inputs = [path for path, _ in images] + ([input_path] if input_path.is_file() else [])
    if keypoints is not None and not isinstance(keypoints, dict):
        inputs.append(Path(keypoints))
    check_inputs_outside(out_dir, list(dict.fromkeys(inputs)))  # a single photo is also the input path
    if keypoints is not None:
        table = keypoints if isinstance(keypoints, dict) else load_keypoints(keypoints)
        found_by, face_finder = "keypoint file", None
    else:
        table = None
        detector = DEFAULT_DETECTOR if detector is None else detector
        found_by = detector if isinstance(detector, str) else getattr(detector, "name", type(detector).__name__)
        face_finder = make_detector(detector, min_score=min_score) if isinstance(detector, str) else detector
    try:
        check_output_folder(out_dir)
    except OutputFolderError as err:  # a bad argument of run(), reported as the others are
        raise InputError(str(err)) from err

    report = {"input": str(input_path), "detector": found_by, "processed": [], "failed": [],
              "interrupted": True, "not_attempted": len(images)}
    used_names: dict[str, str] = {}
    try:
        with logging_redirect_tqdm():
            for image_path, relative in progress(images, desc="preprocess", unit="image"):
                name = Path(relative).stem
                try:
                    if name in used_names:
                        raise InputError(f"output name {name!r} already used by {used_names[name]}")
                    entry = process_image(image_path, relative, out_dir, table, face_finder, min_score, max_pixels)
                except BaseException as err:  # any failure of one photo is that photo's failure (Ctrl-C: see below)
                    if name not in used_names:  # no partial or stale crops under a failed name
                        _remove_outputs(out_dir, name)
                    if not isinstance(err, Exception):  # Ctrl-C, SystemExit: stop (the report follows)
                        raise
                    reason = failure_reason(err)  # the report's entry names the image
                    logger.warning("skipped %s: %s", image_path, reason)
                    report["failed"].append({"image": str(image_path), "reason": reason})
                else:
                    report["processed"].append(entry)
                    used_names[name] = str(image_path)
                report["not_attempted"] -= 1
        report["interrupted"] = False
    except KeyboardInterrupt as err:
        raise RunInterrupted(report) from err
    finally:
        _write_report(out_dir, report)
    return report
