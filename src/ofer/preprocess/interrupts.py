"""Stopping a run cleanly: SIGTERM (a scheduler, `kill`, a container stop) acts as Ctrl-C does.

Both raise KeyboardInterrupt, so one code path writes the report and exits 130. This module
imports nothing heavy: `python -m ofer.preprocess` installs the handler before torch and
OpenCV are imported, so a stop during start-up is an interrupt too, not a kill.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status for Ctrl-C


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (in the main thread; elsewhere a no-op)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
