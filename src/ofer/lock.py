"""One lock for an output folder, held by one run (test.py, a training script) until it ends.

Two runs writing into one folder would mix their files (test.py's outputs and summaries, a
trainer's checkpoints, whose temporaries the other would delete as stale), so a run holds
`<folder>/<name>` while it works. The lock file says who holds it (program, pid, host, start
time) and its owner keeps an exclusive `flock` on it:

- taking a free lock is a hard link of a fully written, already flocked temporary file onto
  the lock name, which fails when the name exists, so exactly one run gets it;
- a lock whose `flock` is free but whose file is still there was left by a run that was
  killed (the kernel drops a dead process's flocks). Its pid is checked as well (on this host
  it must be dead); then the new owner, holding the old file's `flock`, puts its own file in
  place with `os.replace`. Whoever takes a stale lock over holds the old file's flock while it
  does, so of several processes racing for one stale lock exactly one wins;
- a lock from another host, one whose pid is alive, or one whose contents cannot be read
  (empty, not JSON, no valid pid) counts as held: the message says which file to delete
  if no run is going on. So does a stale lock on a file system without `flock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from ofer.io import OutputFolderError

log = logging.getLogger(__name__)

MAX_PID = 2**31 - 1  # os.kill takes a C int
_MAX_LOCK_BYTES = 4096  # an owner record is ~100 bytes; anything far larger is not one


def lock_holder(lock: Path) -> dict | None:
    """Who holds `lock` ({program, pid, host, started}), or None when it is absent or unreadable.

    Unreadable: not UTF-8 JSON, not an object, no whole pid in [1, MAX_PID], no host string.
    """
    try:
        with open(lock, "rb") as handle:
            raw = handle.read(_MAX_LOCK_BYTES + 1)
        holder = json.loads(raw.decode("utf-8")) if len(raw) <= _MAX_LOCK_BYTES else None
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(holder, dict):
        return None
    pid, host = holder.get("pid"), holder.get("host")
    if type(pid) is not int or not 1 <= pid <= MAX_PID or not isinstance(host, str):
        return None
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock on `fd` without waiting: True taken, False held by another
    open file (a live run), None when the file system does not support flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on some network file systems
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    """True when `path` still names the file open as `fd` (not removed or replaced since)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class FolderLock:
    """`<folder>/<name>`, held by one run of `program` from `acquire` to `release`.

    `elsewhere` completes "wait for it to end or ..." in the refusal, e.g. "use another --outputpath".
    """

    def __init__(self, folder: Path, name: str, program: str, elsewhere: str):
        self.path = Path(folder) / name
        self.elsewhere = elsewhere
        self.owner = {"program": program, "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._fd: int | None = None  # the open lock file while held (its flock is the lock)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise OutputFolderError naming the run that holds it."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.")
        try:
            os.write(fd, json.dumps(self.owner).encode())
            flock = _try_flock(fd)  # a new file: taken, or None without flock support
            for _ in range(10):  # each retry follows a lock that was released or replaced meanwhile
                try:
                    os.link(tmp, self.path)  # atomic, fails if the lock exists: the lock is always whole
                    self._fd, fd = fd, None
                    return
                except FileExistsError:
                    pass
                if self._take_over_stale(tmp, flock):
                    self._fd, fd = fd, None
                    return
            raise OutputFolderError(f"could not take the lock {self.path} (other runs keep taking and releasing it)")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # after a link the lock name keeps the file; after a replace it is gone
            if fd is not None:
                os.close(fd)

    def _take_over_stale(self, tmp: str, flock: bool | None) -> bool:
        """Replace the existing lock by `tmp` if it is stale; False when it vanished meanwhile
        (try again); OutputFolderError when it is held."""
        try:
            old = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # released just now
            return False
        try:
            if not flock:
                took = None
            else:
                took = _try_flock(old)
                if took and not _same_file(old, self.path):  # released or taken over before our flock
                    return False
            holder = lock_holder(self.path)
            if took is False:
                self._refuse(holder)
            if holder is None:
                self._refuse(None, "its lock file cannot be read")
            if holder.get("host") != self.owner["host"]:
                self._refuse(holder, "a lock from another host cannot be checked")
            if _alive(holder["pid"]):
                self._refuse(holder)
            if took is None:
                self._refuse(holder, "its process is no longer running, but without flock on this file system "
                                     "a stale lock is not taken over automatically")
            os.replace(tmp, self.path)  # atomic; while we hold the old file's flock nobody else can do this
            log.warning("took over a stale lock of %s pid %s (no longer running): %s",
                        holder.get("program", "a run"), holder["pid"], self.path)
            return True
        finally:
            os.close(old)

    def _refuse(self, holder: dict | None, why: str = "") -> None:
        if holder is None:
            who = "an unknown process"
        else:
            who = (f"{holder.get('program', 'a run')} pid {holder['pid']} on {holder['host']} "
                   f"since {holder.get('started', '?')}")
        raise OutputFolderError(
            f"output folder {self.path.parent} is in use by {who}{f' ({why})' if why else ''}; wait for it to end "
            f"or {self.elsewhere} (if no run is going on, delete {self.path})")

    def release(self) -> None:
        """Remove the lock if it is still ours (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None
