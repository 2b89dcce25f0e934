"""The output-folder lock (`ofer.lock`) that test.py and the training scripts take."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from ofer.inference.outfolder import LOCK_NAME, OutputFolderError, OutputLock


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has ended (what a killed run leaves in its lock)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _race_for_the_lock(folder, barrier, results, trials):
    """One contender: in every trial try to take the stale lock, report, then let go."""
    for trial in range(trials):
        barrier.wait()  # the stale lock is in place
        lock = OutputLock(folder)
        try:
            lock.acquire()
            results.put((trial, True))
        except OutputFolderError:
            results.put((trial, False))
        barrier.wait()  # everyone has tried: winners hold the lock until now
        lock.release()
        barrier.wait()


def test_of_several_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path, dead_pid):
    contenders, trials = 4, 25
    context = multiprocessing.get_context("fork")  # cheap to start; the contenders only touch files
    barrier, results = context.Barrier(contenders + 1), context.Queue()
    procs = [context.Process(target=_race_for_the_lock, args=(tmp_path, barrier, results, trials))
             for _ in range(contenders)]
    for proc in procs:
        proc.start()
    lock = tmp_path / LOCK_NAME
    winners = []
    try:
        for _ in range(trials):
            lock.unlink(missing_ok=True)
            lock.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "x"}))
            barrier.wait()
            barrier.wait()
            winners.append(sum(results.get(timeout=10)[1] for _ in range(contenders)))
            barrier.wait()
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert winners == [1] * trials


@pytest.mark.parametrize("contents", [b'{"pid": "abc", "host": "h"}', b"[1, 2]", b'{"host": "h"}', b'{"pid": 1e30}',
                                      b'{"pid": 123456789012, "host": "h"}', b'{"pid": true, "host": "h"}',
                                      b"\xff\xfe\x00garbage", b""],
                         ids=["pid-str", "list", "no-pid", "pid-float", "pid-huge", "pid-bool", "binary", "empty"])
def test_an_unreadable_lock_counts_as_held_by_an_unknown_process(tmp_path, contents):
    (tmp_path / LOCK_NAME).write_bytes(contents)
    with pytest.raises(OutputFolderError) as err:
        OutputLock(tmp_path).acquire()
    assert str(err.value) == (f"output folder {tmp_path} is in use by an unknown process (its lock file cannot be "
                              f"read); wait for it to end or use another --outputpath (if no run is going on, delete "
                              f"{tmp_path / LOCK_NAME})")
    assert (tmp_path / LOCK_NAME).read_bytes() == contents  # left as it was


def test_a_lock_is_free_again_after_release_and_a_dead_holder_frees_it(tmp_path):
    first = OutputLock(tmp_path)
    first.acquire()
    with pytest.raises(OutputFolderError, match=f"in use by test.py pid {os.getpid()}"):
        OutputLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # A run killed while holding the lock (its flock goes with it) leaves a lock that the next run takes.
    code = ("import os; from pathlib import Path; from ofer.inference.outfolder import OutputLock; "
            f"OutputLock(Path({str(tmp_path)!r})).acquire(); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 9
    assert (tmp_path / LOCK_NAME).exists()
    second = OutputLock(tmp_path)
    second.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary lock files left
