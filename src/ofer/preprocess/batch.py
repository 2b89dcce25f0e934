"""Preprocess a folder of photos: one guarded step per photo, a report that is always written.

For each photo: read it (refusing, from the file header alone, one too large to decode
safely), find its face (a detector or a keypoint file), check that the face lies in the
photo, and only then write `<out>/<name>.jpg` (224 FaRL crop) and `<out>/<name>.npy` (ArcFace
input). Any failure of one photo, whatever raised it, is recorded in
`<out>/preprocess_report.json` with the reason, its files are removed, and the run goes on.
The report and `<out>/list.txt` (the names processed) are written at the end, also when the
run is interrupted (Ctrl-C) or stopped by an unexpected error.
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
    save_npy,
    write_image,
)
from ofer.preprocess.crops import PreparedFace, inside_fraction, prepare_face
from ofer.preprocess.detectors import DEFAULT_DETECTOR, Detector, make_detector, pick_face
from ofer.preprocess.keypoint_files import KeypointEntry, load_keypoints, lookup_keypoints
from ofer.progress import progress

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Largest photo decoded (pixels): above a 108-megapixel phone photo, below what exhausts memory.
MAX_IMAGE_PIXELS = 120_000_000
# Smallest share of each crop that must come from the photo rather than the black border.
MIN_INSIDE_FRACTION = 0.5
KEYPOINT_NAMES = ("left eye", "right eye", "nose tip", "left mouth corner", "right mouth corner")


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
        lines = input_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"{input_path}: not an image suffix ({', '.join(IMAGE_SUFFIXES)}) nor a text list ({err})")
    images = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            path = Path(entry)
            images.append((path if path.is_absolute() else input_path.parent / path, entry))
    return images


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


def _find_face(
    image: np.ndarray, relative: str, keypoints: dict[str, KeypointEntry] | None, detector: Detector | None,
    min_score: float,
) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Keypoints (5, 2), box (4,) or None, and detector score (or None) of the face to crop."""
    if keypoints is not None:
        entry = lookup_keypoints(keypoints, relative)
        if entry is None:
            raise InputError(f"no keypoints for {relative!r} in the keypoint file")
        return entry.kps5, entry.box, None
    boxes, scores, kps = detector.detect(image)
    index = pick_face(boxes, scores, kps, image.shape, min_score)
    if index is None:
        raise InputError(f"no face found (detections: {len(scores)}, min score {min_score})")
    return kps[index], boxes[index], float(scores[index])


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
    image = read_image(image_path, max_pixels)
    kps5, box, score = _find_face(image, relative, keypoints, detector, min_score)
    face = prepare_face(image, kps5, box)
    check_face_in_photo(face, image.shape)
    name = Path(relative).stem
    save_npy(out_dir / f"{name}.npy", face.arcface)
    write_image(out_dir / f"{name}.jpg", face.crop224)
    entry = {
        "image": str(image_path),
        "name": name,
        "box": face.box.round(2).tolist(),
        "kps5": face.kps5.round(2).tolist(),
        "box_estimated": box is None,
    }
    if score is not None:
        entry["score"] = round(score, 4)
    return entry


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
         "interrupted": bool, "not_attempted": int}; also written to the output folder.
    Raises:
        InputError (before any photo is processed) for a missing or empty input, an output
        folder that cannot be written, or a bad keypoint file.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    if keypoints is not None and detector is not None:
        raise ValueError("give a detector or keypoints, not both")
    if input_path.is_dir() and out_dir.exists() and input_path.resolve() == out_dir.resolve():
        raise InputError(f"{out_dir}: the output folder must differ from the input folder")
    images = list_images(input_path)
    if not images:
        raise InputError(f"{input_path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
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
    finally:
        _write_report(out_dir, report)
    return report
