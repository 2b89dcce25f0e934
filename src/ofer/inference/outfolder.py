"""The output folder of test.py: locked for one run (after `ofer.io.check_output_folder`).

Two runs writing into one folder would mix their files and summaries, so a run holds
`<out>/.test.lock` until it ends: `ofer.lock.FolderLock`, the lock the training scripts take
on their output folder too (how it is taken, and when a stale one is taken over, is told there).
"""

from __future__ import annotations

from pathlib import Path

from ofer.io import OutputFolderError
from ofer.lock import FolderLock, lock_holder

__all__ = ["LOCK_NAME", "OutputFolderError", "OutputLock", "lock_holder"]

LOCK_NAME = ".test.lock"


class OutputLock(FolderLock):
    """`<out>/.test.lock`, held by one test.py run from `acquire` to `release`."""

    def __init__(self, out: Path):
        super().__init__(out, LOCK_NAME, "test.py", "use another --outputpath")
