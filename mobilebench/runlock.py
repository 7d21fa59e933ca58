"""One writer per run dir: an OS lock on `<run dir>/.lock`, held while a command writes there.

`flock` locks belong to the open file, so the kernel drops them when the holding process ends,
however it ends (SIGKILL, OOM killer, power loss): a stale lock never blocks the next run. The
file also holds the holder's PID, only to name it in the message; the lock itself is the flock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mobilebench.errors import UserError

try:
    import fcntl
except ImportError:  # not Unix: no OS lock to take, so no guarantee either
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # this process's locks: resolved run dir -> open file descriptor


class RunDirBusy(UserError):
    """Another process holds the run dir's lock."""


def holder(run_dir: Path) -> str:
    """The PID written into the lock file by its holder ("unknown" when unreadable)."""
    try:
        return (run_dir / LOCK_NAME).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(run_dir: Path) -> bool:
    """Take the run dir's lock for this process; True if this call took it, False if already held.

    Raises RunDirBusy, naming the dir and the holder's PID, when another process holds it: nothing
    in the dir is changed then (the lock file is opened, never truncated, unless the lock is ours).
    """
    key = run_dir.expanduser().resolve()
    if fcntl is None or key in _held:
        return False
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"run dir {run_dir} is in use by PID {holder(key)} (another train, resume or prune "
                         "writing there); wait for it to end or pick another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    return True


def release(run_dir: Path) -> None:
    """Drop this process's lock on `run_dir` (the lock file stays; only the flock matters)."""
    fd = _held.pop(run_dir.expanduser().resolve(), None)
    if fd is None:
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Hold the lock for the block; a lock this process already held stays held after it."""
    took = acquire(run_dir)
    try:
        yield
    finally:
        if took:
            release(run_dir)
