"""Progress bars that stay readable in log files (cluster jobs redirect stderr to a file)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar that redraws at most every 30 s when stderr is not a terminal."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return tqdm(*args, **kwargs)
