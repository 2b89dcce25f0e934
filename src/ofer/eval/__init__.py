"""Evaluation: the NoW scan-to-mesh protocol (`now`), sample accuracy and diversity (`metrics`).

Run them as `python -m ofer.eval.now ...` and `python -m ofer.eval.metrics ...`. Submodules are
not imported here, so `python -m` runs them without a double import.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence

from ofer.io import atomic_write

EXIT_COMPLETE, EXIT_MISSING, EXIT_SETUP = 0, 1, 2  # as test.py's: all done, some missing, bad input


def _json_safe(value):
    """Replace NaN by None recursively so the report is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json_report(path: str | os.PathLike, report: dict) -> None:
    """Write an evaluation report as indented JSON (NaN written as null), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(report), indent=2))


def exit_code(main: Callable[[Sequence[str] | None], dict], argv: Sequence[str] | None = None) -> int:
    """Run an evaluation command's `main` and say how it went: EXIT_COMPLETE when every image
    was evaluated, EXIT_MISSING when predictions are missing (the report lists them), EXIT_SETUP
    on bad input or options (InputError naming the file, or another ValueError of the checks:
    one error line instead of a traceback; no report)."""
    try:
        report = main(argv)
    except ValueError as err:  # InputError is one
        logging.getLogger(main.__module__).error("%s", err)
        return EXIT_SETUP
    return EXIT_MISSING if report["n_missing"] else EXIT_COMPLETE
