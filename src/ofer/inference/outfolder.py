"""The output folder of test.py: locked for one run (after `ofer.io.check_output_folder`).

Two runs writing into one folder would mix their files and summaries, so a run holds
`<out>/.test.lock` (its pid, host and start time) until it ends. The lock is created with
a hard link, which fails when the file exists, so exactly one run gets it. A lock left by a
killed run on this host (its pid no longer alive) is stale and taken over; a lock from
another host cannot be checked and must be removed by hand.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from ofer.io import OutputFolderError

log = logging.getLogger(__name__)
LOCK_NAME = ".test.lock"


def lock_holder(lock: Path) -> dict | None:
    """Who holds `lock` (pid, host, started), or None when it is absent or unreadable."""
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputLock:
    """`<out>/.test.lock`, held by one test.py run from `acquire` to `release`."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> None:
        """Take the lock or raise OutputFolderError naming the run that holds it."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".test.lock.")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.owner, handle)
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic, fails if the lock exists: the lock is always whole
                    return
                except FileExistsError:
                    holder = lock_holder(self.path)
                    if holder and holder.get("host") == self.owner["host"] and not _alive(int(holder["pid"])):
                        log.warning("removing a stale lock of test.py pid %s (no longer running): %s",
                                    holder["pid"], self.path)
                        self.path.unlink(missing_ok=True)
                        continue
                    who = (f"test.py pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                           if holder else "another run")
                    raise OutputFolderError(
                        f"output folder {self.path.parent} is in use by {who}; wait for it to end or use another "
                        f"--outputpath (if no run is going on, delete {self.path})") from None
            raise OutputFolderError(f"could not take the lock {self.path}")
        finally:
            os.unlink(tmp)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if lock_holder(self.path) == self.owner:
            self.path.unlink(missing_ok=True)

