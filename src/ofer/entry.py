"""Start a command so that Ctrl-C and SIGTERM are handled from its first line.

A scheduler (or torchrun, or a user) may stop a job while it still imports torch and the
models' code, seconds before the command's own handling is in place. Python's default for
SIGTERM then ends the process with 143 and no word; here SIGTERM is turned into
KeyboardInterrupt, like Ctrl-C, before the command's module is imported, and an interrupt
during the import ends the command with 130 and one line saying that nothing was done.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 130


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler that stops the program as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_interrupt() -> Callable | int | None:
    """Handle SIGTERM as Ctrl-C from now on (main thread only); return the previous handler."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return None
    return signal.signal(signal.SIGTERM, raise_interrupt)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only); the previous handler after it."""
    previous = sigterm_as_interrupt()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_command(module: str, function: str = "main", *args: Any, prog: str | None = None) -> Any:
    """Import `module` with SIGTERM handled as Ctrl-C, then return `module.function(*args)`.

    An interrupt while importing exits with 130 (EXIT_INTERRUPTED) and one line on stderr,
    naming `prog` (default: the script's file name).
    """
    sigterm_as_interrupt()
    try:
        command = getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: interrupted while starting; nothing was done\n")
        sys.exit(EXIT_INTERRUPTED)
    return command(*args)
