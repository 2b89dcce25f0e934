"""Evaluation: the NoW scan-to-mesh protocol (`now`), sample accuracy and diversity (`metrics`).

Run them as `python -m ofer.eval.now ...` and `python -m ofer.eval.metrics ...`. Submodules are
not imported here, so `python -m` runs them without a double import.
"""

from __future__ import annotations

import json
import math
import os

from ofer.io import atomic_write


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
