"""Reliability: exact resume after SIGKILL/SIGTERM, atomic checkpoints, signals, NaN guard, safe
loading, no clobbering, and clear errors for broken data."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobilebench import checkpoint as ckpt_mod
from mobilebench.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mobilebench.engine import Interrupted, NonFiniteLoss, StopFlag
from mobilebench.errors import UserError
from tests.conftest import TINY, train_run

# Long enough epochs (20 steps, ~3 s on one thread) that a signal lands mid-epoch.
LONG = [*TINY, "data.train_subset=640", "trainer.epochs=2", "trainer.log_every=1"]
TIMING = {"epoch_s", "train_images_per_s", "data_s", "compute_s", "eval_s"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _values(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def _start(run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "mobilebench", "train", *LONG, *extra, f"hydra.run.dir={run_dir}"]
    with open(log, "w") as out:  # progress lines go to stdout, errors to stderr: one file for both
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 90) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _log_has(log: Path, text: str):  # noqa: ANN202
    return lambda: text in log.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference")
    train_run(run_dir, *LONG[len(TINY):])
    return run_dir


# 1. Exact resume after SIGKILL: the interrupted epoch is redone from its start.

def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(run_dir, log)
    try:
        _wait_for(_log_has(log, "epoch 2 step 3/20"), proc)  # epoch 1 checkpointed, epoch 2 under way
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    train_run(run_dir, *LONG[len(TINY):], "trainer.resume=auto")
    _assert_same_weights(_weights(reference), _weights(run_dir))
    assert _values(_metrics(run_dir)) == _values(_metrics(reference))


# 3. SIGTERM / SIGINT: save, mark the metrics, exit 2 quickly; resume mid-epoch exactly.

def test_sigterm_saves_and_resume_mid_epoch_is_bit_identical(reference: Path, tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start(run_dir, log)
    try:
        _wait_for(_log_has(log, "epoch 1 step 5/20"), proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 2, err
    # Promptness is the step it stopped at (mid-epoch, below), not seconds: a loaded CI box stretches those.
    assert "mobilebench: error: interrupted by SIGTERM; state saved" in err and "Traceback" not in err
    rows = _metrics(run_dir)
    assert rows[-1]["interrupted"] is True and rows[-1]["epoch"] == 1 and 5 <= rows[-1]["step_in_epoch"] < 20
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["state"]["epoch"] == 0 and saved["state"]["step_in_epoch"] == rows[-1]["step_in_epoch"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    train_run(run_dir, *LONG[len(TINY):], "trainer.resume=auto")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    _assert_same_weights(_weights(reference), _weights(run_dir))
    assert _values(_metrics(run_dir)) == _values(_metrics(reference))


def test_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    # Steps of ~0.5 s: the presses start just after step 2 is logged, so the first and a later one
    # land in step 3 (with 50 ms steps the first one's save could finish before the second).
    proc = _start(run_dir, log, "trainer.epochs=50", "model=v2", "model.width_mult=1.0", "data.batch_size=64")
    try:
        _wait_for(_log_has(log, "epoch 1 step 2/10"), proc)
        # Signals sent back to back coalesce into one, so keep pressing Ctrl-C: the first asks for
        # a save at the end of the step in flight, a later one must cut that short.
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.03)
        proc.wait(10)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err
    assert "state saved" not in err and "Traceback" not in err


def _press_ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the Python-level handler runs at the next bytecode


def test_stop_flag_first_press_stops_second_exits_and_the_exit_path_ignores_more() -> None:
    before = signal.getsignal(signal.SIGINT)
    try:
        with StopFlag() as stop:
            _press_ctrl_c()
            assert stop.signum == signal.SIGINT
            with pytest.raises(Interrupted):
                stop.check()
        # The interrupted run is on its way out: one more press must not kill it mid-exit.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with StopFlag() as stop, pytest.raises(SystemExit) as exc:
            _press_ctrl_c()
            _press_ctrl_c()
        assert exc.value.code == 130
        signal.signal(signal.SIGINT, before)
        with StopFlag():
            pass
        assert signal.getsignal(signal.SIGINT) == before  # an uninterrupted run restores the handler
    finally:
        signal.signal(signal.SIGINT, before)


# 2 and 6. Atomic saves: a crash or a full disk while saving leaves the old checkpoint intact.

def _crash_half_way(obj, f) -> None:  # noqa: ANN001
    f.write(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("killed while saving")


@pytest.mark.parametrize("failure", ["crash", "disk_full"])
def test_failed_save_keeps_the_previous_checkpoint(failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model_args": {"name": "v1"}, "model": {"w": torch.ones(3)}}, path)

    def disk_full(obj, f) -> None:  # noqa: ANN001
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.torch, "save", _crash_half_way if failure == "crash" else disk_full)
    expected = RuntimeError if failure == "crash" else CheckpointError
    with pytest.raises(expected) as err:
        save_checkpoint({"model_args": {"name": "v1"}, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    if failure == "disk_full":
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and "No space left" in msg
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


# 4. NaN/Inf guard.

class _NaNOnCalls(torch.nn.CrossEntropyLoss):
    """Cross-entropy that returns NaN on the given (1-based) training calls."""

    calls = 0
    bad: set[int] = set()

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        loss = super().forward(logits, y)
        return loss * float("nan") if type(self).calls in self.bad else loss


def _nan_loss(monkeypatch: pytest.MonkeyPatch, bad: set[int]) -> None:
    monkeypatch.setattr(_NaNOnCalls, "calls", 0)
    monkeypatch.setattr(_NaNOnCalls, "bad", bad)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", _NaNOnCalls)


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss(monkeypatch, {5})  # 3 steps per epoch: the 2nd step of epoch 2
    with pytest.raises(NonFiniteLoss) as err:
        train_run(tmp_path, "trainer.epochs=3")
    msg = str(err.value)
    assert "\n" not in msg and "loss became nan at step 4, epoch 2, lr " in msg and "nan_policy=skip" in msg
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["state"]["epoch"] == 1 and saved["state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_nan_policy_skip_skips_bad_batches_up_to_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss(monkeypatch, {2, 4})
    train_run(tmp_path / "ok", "trainer.epochs=2", "trainer.nan_policy=skip", "trainer.nan_skip_limit=2")
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_batches"] == 2
    assert load_checkpoint(tmp_path / "ok" / "checkpoints" / "last.pt")["state"]["step"] == 4  # 6 batches, 2 skipped

    _nan_loss(monkeypatch, {2, 4})
    with pytest.raises(NonFiniteLoss, match="over trainer.nan_skip_limit=1"):
        train_run(tmp_path / "over", "trainer.epochs=2", "trainer.nan_policy=skip", "trainer.nan_skip_limit=1")


# 5. Safe loading: refuse pickled code; one line per broken checkpoint, via the CLI.

class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - unpickling this would create the marker file
        return (open, (self.marker, "w"))


def _cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    from mobilebench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mobilebench: error: ") and "Traceback" not in err, err
    return lines[0]


def _eval_error(capsys: pytest.CaptureFixture, path: Path, out: Path) -> str:
    return _cli_error(capsys, "eval", f"checkpoint={path}", "data=synthetic", "trainer.threads=1", f"hydra.run.dir={out}")


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    blob = load_checkpoint(reference / "checkpoints" / "last.pt")
    blob["config"] = {"payload": _Evil(marker)}
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    line = _eval_error(capsys, evil, tmp_path / "out")
    assert str(evil) in line and "pickled Python objects" in line and "refused" in line
    assert not marker.exists()


def _broken(kind: str, good: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 50)
    else:
        blob = load_checkpoint(good)
        if kind == "newer":
            blob["format_version"] = ckpt_mod.FORMAT_VERSION + 1
        else:  # "other_model": weights of one network under another's name
            blob["model_args"] = {**blob["model_args"], "name": "v1"}
            blob["ema"] = None
        torch.save(blob, path)
    return path


@pytest.mark.parametrize(("kind", "says"), [("truncated", "truncated or corrupt"), ("garbage", "corrupt"),
                                            ("newer", "newer than this mobilebench reads"),
                                            ("other_model", "does not fit the model")])
def test_broken_checkpoint_is_one_line_naming_the_file(kind: str, says: str, reference: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    path = _broken(kind, reference / "checkpoints" / "last.pt", tmp_path)
    line = _eval_error(capsys, path, tmp_path / "out")
    assert str(path) in line and says in line


def test_resume_with_a_different_model_is_refused(reference: Path, tmp_path: Path) -> None:
    last = reference / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError) as err:
        train_run(tmp_path, "model.width_mult=0.5", f"trainer.resume={last}")
    msg = str(err.value)
    assert "\n" not in msg and str(last) in msg and "same model settings" in msg


# 6. Outputs are never clobbered; unwritable dirs fail up front.

def test_finished_run_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    train_run(tmp_path, "trainer.max_steps_per_epoch=1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "summary.json", tmp_path / "metrics.jsonl", tmp_path / "checkpoints" / "last.pt")}
    with pytest.raises(UserError, match="already holds a finished run.*trainer.overwrite=true"):
        train_run(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.seed=1")
    after = {p.name: p.read_bytes() for p in (tmp_path / "summary.json", tmp_path / "metrics.jsonl", tmp_path / "checkpoints" / "last.pt")}
    assert after == before
    train_run(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.seed=1", "trainer.overwrite=true")
    assert len(_metrics(tmp_path)) == 1  # replaced, not appended to
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 1


def test_unwritable_run_dir_is_one_clear_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file, so nothing can be created under it even as root")
    with pytest.raises(UserError) as err:
        train_run(afile / "run")
    msg = str(err.value)
    assert "\n" not in msg and "not writable" in msg and str(afile / "run") in msg


# 7. Data checks (unreadable images and out-of-range labels are covered in test_data.py).

def test_truncated_cifar_pickle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobilebench.config import DataConfig
    from mobilebench.data import DataError, load_data
    from tests.test_data import _write_cifar10

    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False, val_size=0))
    msg = str(err.value)
    assert "\n" not in msg and "corrupt" in msg and str(tmp_path) in msg and "re-download" in msg
