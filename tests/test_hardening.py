"""Hardening: one writer per run dir, a native library that cannot be planted, verified image
caches, checkpoint paths as users type them, and faults under load (a killed sweep, a full disk)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mobilebench.accel import native
from mobilebench.checkpoint import load_checkpoint
from mobilebench.config import DataConfig
from mobilebench.data import load_data, tensor_checksum

from .conftest import TINY, run_cli

SLOW_RUN = [*TINY, "trainer.epochs=500"]  # ~0.4 s an epoch: long enough to catch it mid-run


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mobilebench", "train", *SLOW_RUN, *overrides,
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def stopped(pid: int) -> bool:
    """The process is in the stopped state ('T' in /proc/PID/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- one writer per run dir ------------------------------------------------------------------


def test_a_second_writer_into_a_busy_run_dir_stops_and_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = start_train(run_dir)
    try:
        # An epoch's metrics line is appended before its checkpoint is saved: wait for both.
        wait_for(lambda: metric_lines(run_dir) >= 1 and (run_dir / "checkpoints" / "last.pt").exists(),
                 what="the first run's first epoch and its checkpoint")
        os.kill(first.pid, signal.SIGSTOP)  # hold it still, lock held, so its files stand still
        # kill() returns before the stop lands; a write in flight (the next checkpoint's temp file)
        # would otherwise still grow after the snapshot.
        wait_for(lambda: stopped(first.pid), timeout=30, what="the first run to stop")
        before = snapshot(run_dir)
        for args in (["train", *SLOW_RUN, "trainer.resume=auto"],
                     ["prune", f"checkpoint={run_dir}", "method=l1_unstructured"]):
            second = run_cli(*args, f"hydra.run.dir={run_dir}")
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2, second.stderr[-2000:]
            assert len(lines) == 1 and str(run_dir) in lines[0] and f"PID {first.pid}" in lines[0], lines
            assert snapshot(run_dir) == before  # not a byte written, .hydra/ and the log included
        # A lock left by a killed process never blocks the next run: the kernel drops it.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        done = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["epoch"]
        resumed = run_cli("train", *SLOW_RUN, "trainer.resume=auto", f"trainer.epochs={done + 1}",
                          f"hydra.run.dir={run_dir}")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)


def test_the_lock_is_the_processs_own_and_released_after_the_command(tmp_path: Path) -> None:
    from mobilebench import runlock

    with runlock.holding(tmp_path):
        assert runlock.acquire(tmp_path) is False  # already this process's: no second lock, no deadlock
        assert runlock.holder(tmp_path) == str(os.getpid())
        probe = run_cli("train", *TINY, f"hydra.run.dir={tmp_path}")
        assert probe.returncode == 2 and f"PID {os.getpid()}" in probe.stderr
    after = run_cli("train", *TINY, f"hydra.run.dir={tmp_path}")
    assert after.returncode == 0, after.stderr[-2000:]


# --- a native library that cannot be planted ------------------------------------------------

PLANTED = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANT_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
void depthwise_weight_grad(const float *g, const float *x, float *a, int64_t n0, int64_t n1, int64_t c,
                           int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t k, int64_t s, int64_t p) {}
"""

PROBE = ("from mobilebench.accel import native; p = native.library_path(); "
         "print(native.unavailable_reason() or 'on', p, oct(p.parent.stat().st_mode & 0o777))")


def plant(tmp_path: Path, cache: Path, mode: int, file_mode: int, digest: str | None) -> list[Path]:
    """A library whose constructor writes a marker, under every name the cache would look for."""
    cc = native._compiler()
    if cc is None:
        pytest.fail("no C compiler to test the build with; this machine's image ships gcc")
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    folder = cache / "native"
    folder.mkdir(parents=True, exist_ok=True)
    planted = []
    for flags in native.FLAG_SETS:
        target = folder / native.library_name(cc, flags)
        subprocess.run([*cc, "-shared", "-fPIC", str(source), "-o", str(target)], check=True)
        target.chmod(file_mode)
        if digest is not None:
            (folder / f"{target.name}.sha256").write_text((digest or native._sha256(target)) + "\n")
        planted.append(target)
    folder.chmod(mode)
    return planted


def probe(cache: Path, marker: Path) -> tuple[str, Path, str]:
    """In a fresh process: the kernel's state, the file it loaded and that file's dir mode."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "MOBILEBENCH_CACHE": str(cache), "PLANT_MARKER": str(marker)})
    state, path, mode = out.stdout.split()
    return state, Path(path), mode


@pytest.mark.parametrize("case", ["world-writable dir", "group-writable file", "digest does not match", "no digest"])
def test_a_planted_native_library_is_never_loaded(case: str, tmp_path: Path) -> None:
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    dir_mode, file_mode, digest = {
        "world-writable dir": (0o777, 0o755, ""),  # "" records the planted file's own hash: only permissions stop it
        "group-writable file": (0o700, 0o775, ""),
        "digest does not match": (0o700, 0o700, "0" * 64),
        "no digest": (0o700, 0o700, None),
    }[case]
    planted = plant(tmp_path, cache, dir_mode, file_mode, digest)
    contents = {p: p.read_bytes() for p in planted}
    state, loaded, mode = probe(cache, marker)
    assert not marker.exists(), "the planted library's code ran"
    assert state == "on"  # a real build of the kernel took its place
    if case == "world-writable dir":
        assert loaded.parent != cache / "native" and mode == "0o700"
    else:  # a private dir: rebuilt in place, over the planted file, with its digest beside it
        assert loaded in planted and loaded.read_bytes() != contents[loaded]
        assert (loaded.parent / f"{loaded.name}.sha256").read_text().strip() == native._sha256(loaded)
    again = probe(cache, marker)
    assert again[0] == "on" and not marker.exists()
    if case == "world-writable dir":
        assert not loaded.exists() and again[1] != loaded  # each process builds its own, removed at its exit
    else:
        assert again[1] == loaded  # the next run reuses that build


# --- verified image caches ---------------------------------------------------------------------


def image_folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}_{j}.png")
    return root


def folder_config(root: Path) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), val_size=0, image_size=12)


def cache_file(root: Path) -> Path:
    return root / ".mobilebench_cache" / "train_12px.pt"


def test_a_cache_that_fails_its_checksum_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "imgs")
    first = load_data(folder_config(root))
    blob = torch.load(cache_file(root), weights_only=True)
    assert blob["checksum"] == tensor_checksum(blob["x"], blob["y"], blob["classes"])
    blob["y"] = 1 - blob["y"]  # wrong labels, the checksum left as it was
    torch.save(blob, cache_file(root))
    with caplog.at_level(logging.INFO, logger="mobilebench"):
        again = load_data(folder_config(root))
    assert torch.equal(again.train.y, first.train.y) and torch.equal(again.train.x, first.train.x)
    assert sum("do not match their checksum" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("damage", ["truncated", "another user"])
def test_a_truncated_or_foreign_cache_is_rebuilt(damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "imgs")
    first = load_data(folder_config(root))
    if damage == "truncated":
        data = cache_file(root).read_bytes()
        cache_file(root).write_bytes(data[: len(data) // 2])
        said = "unreadable (truncated or corrupt)"
    else:  # a cache owned by someone else: as another user sees ours
        monkeypatch.setattr(os, "getuid", lambda: os.stat(cache_file(root)).st_uid + 1)
        said = "written by another user"
    with caplog.at_level(logging.INFO, logger="mobilebench"):
        again = load_data(folder_config(root))
    assert torch.equal(again.train.x, first.train.x) and torch.equal(again.train.y, first.train.y)
    assert any(said in r.message for r in caplog.records), [r.message for r in caplog.records]


def test_a_folder_that_gains_or_loses_an_image_rebuilds_its_cache(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    assert len(load_data(folder_config(root)).train) == 12
    Image.new("RGB", (12, 12), (255, 0, 0)).save(root / "train" / "dog" / "extra.png")
    grown = load_data(folder_config(root)).train
    assert len(grown) == 13 and int((grown.y == 1).sum()) == 7  # the new image, with its label
    (root / "train" / "cat" / "0_0.png").unlink()
    shrunk = load_data(folder_config(root)).train
    assert len(shrunk) == 12 and int((shrunk.y == 0).sum()) == 5


def test_two_processes_decoding_one_folder_at_once_leave_one_valid_cache(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", per_class=300)
    code = textwrap.dedent(f"""
        from mobilebench.config import DataConfig
        from mobilebench.data import load_data
        print(len(load_data(DataConfig(name="imagefolder", root={str(root)!r}, val_size=0, image_size=12)).train))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["600", "600"]
    blob = torch.load(cache_file(root), weights_only=True)
    assert blob["checksum"] == tensor_checksum(blob["x"], blob["y"], blob["classes"]) and len(blob["y"]) == 600
    assert sorted(p.name for p in cache_file(root).parent.iterdir()) == ["test_12px.pt", "train_12px.pt"]  # no leftovers


# --- checkpoint paths as users type them -------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_a_run_dir_passed_as_checkpoint_takes_its_best_pt(trained: Path, tmp_path: Path) -> None:
    proc = run_cli("eval", f"checkpoint={trained}", f"hydra.run.dir={tmp_path}/eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"using {trained / 'checkpoints' / 'best.pt'}" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["checkpoint"] == str(trained / "checkpoints" / "best.pt")


@pytest.mark.parametrize("kind, says", [
    ("empty dir", "is a directory without checkpoints"),
    ("empty file", "is empty (0 bytes)"),
    ("onnx", "is an ONNX model, not a training checkpoint"),
    ("pte", "is an ExecuTorch program, not a training checkpoint"),
])
def test_a_checkpoint_path_that_is_not_a_checkpoint_is_one_line(kind: str, says: str, tmp_path: Path) -> None:
    path = {"empty dir": tmp_path / "nothing", "empty file": tmp_path / "empty.pt", "onnx": tmp_path / "model.onnx",
            "pte": tmp_path / "model.pte"}[kind]
    if kind == "empty dir":
        path.mkdir()
    else:
        path.write_bytes(b"" if kind == "empty file" else b"\x08\x07graph")
    proc = run_cli("eval", f"checkpoint={path}", f"hydra.run.dir={tmp_path}/eval")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(path) in lines[0] and says in lines[0], lines


# --- faults under load -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_joblib_sweep_killed_by_sigterm_mid_epoch_leaves_resumable_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "mobilebench", "train", "-m", "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", "optimizer.lr=0.01,0.02", *SLOW_RUN, f"hydra.sweep.dir={sweep}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    jobs = [sweep / "0_v3_small", sweep / "1_v3_small"]
    try:
        wait_for(lambda: all(metric_lines(j) >= 2 for j in jobs), timeout=240, what="both jobs' second epoch")
        os.killpg(proc.pid, signal.SIGTERM)  # the whole sweep: launcher and both workers, as SLURM preemption does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for job in jobs:
        blob = load_checkpoint(job / "checkpoints" / "last.pt")
        done = blob["state"]["epoch"]
        resumed = run_cli("train", *SLOW_RUN, f"optimizer.lr={0.01 if job.name[0] == '0' else 0.02}",
                          "trainer.resume=auto", f"trainer.epochs={done + 1}", f"hydra.run.dir={job}")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert json.loads((job / "summary.json").read_text())["epochs_done"] == done + 1


FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
from mobilebench.errors import UserError
from mobilebench.runfiles import RunFiles

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
files = RunFiles(Path(sys.argv[1]), enabled=True)
for epoch in range(1, 10_000):
    try:
        files.append_metrics({"epoch": epoch, "train_loss": 1.0 / epoch, "note": "x" * 37})
    except UserError as err:
        print(epoch, err)
        break
"""


def test_a_disk_that_fills_during_a_metrics_append_leaves_whole_lines(tmp_path: Path) -> None:
    limit = 1000  # bytes the file may grow to: the kernel refuses the rest, as a full disk does
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(limit)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    failed_at, message = out.split(" ", 1)
    assert "cannot append to" in message and "trainer.resume=auto" in message
    text = (tmp_path / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert text.endswith("\n") and [r["epoch"] for r in rows] == list(range(1, int(failed_at)))
    assert len(text.encode()) <= limit and len(rows) >= 5
