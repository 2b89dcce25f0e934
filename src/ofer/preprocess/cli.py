"""`python -m ofer.preprocess`: photos -> the two crops OFER reads, with a report.

    python -m ofer.preprocess --input PHOTOS --out CROPS                  # MTCNN, offline (default)
    python -m ofer.preprocess --input PHOTOS --out CROPS --keypoints FILE # keypoints you measured
    python -m ofer.preprocess --input PHOTOS --out CROPS --detector scrfd [--detector-dir DIR] [--allow-download]

Exit status: 0 when every photo was processed, 1 when any failed (see the report), 2 for a
bad command line or input (an output folder holding input files included), 130 when
interrupted by Ctrl-C or SIGTERM (the report is written all the same once photos were being
processed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ofer.entry import EXIT_INTERRUPTED, sigterm_interrupts
from ofer.io import InputError
from ofer.preprocess.batch import MAX_IMAGE_PIXELS, RunInterrupted, run
from ofer.preprocess.detectors import DEFAULT_DETECTOR, DEFAULT_DETECTOR_DIR, DETECTORS, make_detector

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ofer.preprocess",
        description="Crop faces from photos: <out>/<name>.jpg (224 FaRL crop) and <out>/<name>.npy "
        "(ArcFace input), <out>/list.txt and <out>/preprocess_report.json.",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="folder of images, one image, or a text file listing images"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--keypoints", type=Path, help="JSON or text file with 5 keypoints (and optional box) per image"
    )
    source.add_argument(
        "--detector",
        choices=DETECTORS,
        help=f"face detector (default {DEFAULT_DETECTOR}, offline; scrfd is insightface's, as the original)",
    )
    parser.add_argument(
        "--detector-dir",
        type=Path,
        help=f"scrfd only: insightface antelopev2 folder (default {DEFAULT_DETECTOR_DIR}); implies --detector scrfd",
    )
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="scrfd only: let insightface download its antelopev2 pack into --detector-dir when it is missing",
    )
    parser.add_argument("--min-score", type=float, default=0.5, help="detector score threshold (default 0.5)")
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=MAX_IMAGE_PIXELS / 1e6,
        help=f"refuse larger photos from their header (default {MAX_IMAGE_PIXELS / 1e6:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    scrfd_options = args.detector_dir is not None or args.allow_download
    if scrfd_options and (args.keypoints is not None or args.detector == "mtcnn"):
        parser.error("--detector-dir and --allow-download apply to --detector scrfd only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_interrupts():
            if args.keypoints is not None:
                source = {"keypoints": args.keypoints}
            else:
                name = "scrfd" if scrfd_options else (args.detector or DEFAULT_DETECTOR)
                source = {"detector": make_detector(name, args.detector_dir, args.min_score, args.allow_download)}
            report = run(
                args.input, args.out, min_score=args.min_score, max_pixels=int(args.max_megapixels * 1e6), **source
            )
    except (InputError, ImportError) as err:
        logger.error("%s", err)
        return 2
    except RunInterrupted:
        logger.error("interrupted; the report lists what was done: %s", args.out / "preprocess_report.json")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        logger.error("interrupted before any photo was processed; nothing was written")
        return EXIT_INTERRUPTED
    n_ok, n_failed = len(report["processed"]), len(report["failed"])
    print(f"processed {n_ok} image(s), failed {n_failed}; report: {args.out / 'preprocess_report.json'}")
    return 0 if n_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
