"""A run dir's files (metrics.jsonl, summary.json, checkpoints/) and the file-safety helpers every
writer shares: whole-file replacement and "is this file someone else's?"."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mobilebench.errors import UserError


class RunFiles:
    """metrics.jsonl, summary.json and checkpoints/ of one run dir (rank 0 writes, others no-op)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.dir, self.enabled = run_dir, enabled
        self.metrics = run_dir / "metrics.jsonl"
        self.summary = run_dir / "summary.json"
        self.last = run_dir / "checkpoints" / "last.pt"
        self.best = run_dir / "checkpoints" / "best.pt"

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line, whole or not at all: a write cut short (a full disk, a file-size
        limit) is truncated away again and reported as one line."""
        if not self.enabled:
            return
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(28, "No space left on device")  # a short write: the disk filled mid-line
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise UserError(f"cannot append to {self.metrics}: {err.strerror or err}; free disk space, then resume "
                            f"with trainer.resume=auto hydra.run.dir={self.dir}") from None
        finally:
            os.close(fd)

    def truncate_metrics(self, epoch: int) -> None:
        """Keep the epochs a resumed checkpoint already has; drop later and interrupted lines."""
        if not self.enabled or not self.metrics.exists():
            return
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if not r.get("interrupted") and r.get("epoch", 0) <= epoch]
        write_json_atomic(self.metrics, None, text="".join(json.dumps(r) + "\n" for r in keep))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_json_atomic(self.summary, summary)

    def read_summary(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], fsync: bool = False) -> None:
    """Fill a temporary file beside `path` with `write`, then rename it over `path`.

    Readers see the old file or the new one, never half of one; each call writes its own temporary
    (created with the usual umask), so concurrent writers each land a whole file and the last
    rename wins. On any failure the temporary is removed and the error propagates. `fsync` also
    flushes the file and the rename to disk, so a power cut cannot undo either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def foreign_owner(path: Path) -> int | None:
    """The uid owning `path` when it is not this process's user (None when it is ours, or off Unix)."""
    getuid = getattr(os, "getuid", None)
    owner = path.stat().st_uid
    return owner if getuid is not None and owner != getuid() else None


def write_json_atomic(path: Path, obj: Any, text: str | None = None) -> None:
    """Write `obj` as JSON (or `text` as is) with `atomic_write`: never half a file."""
    data = (text if text is not None else json.dumps(obj, indent=2) + "\n").encode()
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; free disk space or pick a writable hydra.run.dir") from None


def check_run_dir(files: RunFiles, overwrite: bool, resume: str | None) -> None:
    """Refuse to clobber a finished run, and fail early on an unwritable dir."""
    try:
        files.dir.mkdir(parents=True, exist_ok=True)
        probe = files.dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run dir {files.dir} is not writable ({err.strerror or err}); set hydra.run.dir to a writable path") from None
    previous = files.read_summary()
    if previous and previous.get("status") == "completed" and not overwrite and resume is None:
        raise UserError(f"{files.dir} already holds a finished run; pick another hydra.run.dir or set trainer.overwrite=true")
    if overwrite and resume is None:
        for path in (files.metrics, files.summary, files.last, files.best):
            path.unlink(missing_ok=True)
