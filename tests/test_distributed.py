"""DDP through torchrun: 2 gloo ranks on CPU against one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilebench import cli, runtime
from mobilebench.errors import UserError

from .conftest import TINY, train_run

# v2 (BN momentum 0.1) learns the synthetic set in ~24 steps; no augmentation, so the only
# differences between the runs are the per-rank BatchNorm batches and float summation order.
RECIPE = ["trainer.device=cpu", "model=v2", "data.train_subset=256", "data.val_size=32", "data.test_subset=32", "trainer.epochs=3",
          "augment=none", "optimizer.lr=0.05"]
GLOBAL_BATCH = 32
# Every global step sees the same 32 images in both runs (the ranks split one permutation), so the
# training curves track each other; validation accuracy after 24 steps is noisier (BN running
# statistics still lag the weights), hence the looser bound.
TRAIN_ACC_TOL = 0.15
VAL_ACC_TOL = 0.25


def torchrun(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mobilebench",
           "train", *TINY, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    loggers = []
    if importlib.util.find_spec("tensorboard") and importlib.util.find_spec("mlflow"):  # the track extra
        loggers = ["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]
    proc = torchrun(tmp_path, *RECIPE, *loggers, f"data.batch_size={GLOBAL_BATCH // 2}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single_dir = tmp_path / "single"
    train_run(single_dir, *RECIPE, f"data.batch_size={GLOBAL_BATCH}")

    # One set of outputs, written by rank 0 only; the trackers too (one process, one MLflow run).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"] + (["store"] if loggers else [])
    if loggers:
        from mlflow.tracking import MlflowClient

        writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
        assert len(writers) == 1, writers  # the pid in each event file's name
        client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("mobilebench").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    out = proc.stdout + proc.stderr
    assert out.count("global batch 16 x 2 = 32") == 1, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (summary["world_size"], summary["batch_size"], summary["global_batch_size"]) == (2, 16, 32)
    ddp_rows, single_rows = metrics(run_dir), metrics(single_dir)
    assert len(ddp_rows) == len(single_rows) == 3

    # Train loss/acc are averaged over both shards; the run learned and tracks the single process.
    assert ddp_rows[-1]["train_loss"] < ddp_rows[0]["train_loss"] - 0.5
    for ddp, one in zip(ddp_rows, single_rows):
        assert abs(ddp["train_acc"] - one["train_acc"]) <= TRAIN_ACC_TOL, (ddp_rows, single_rows)
    single = json.loads((single_dir / "summary.json").read_text())
    assert abs(summary["best_val_acc"] - single["best_val_acc"]) <= VAL_ACC_TOL
    assert 0.0 <= summary["test_acc"] <= 1.0


SKEW = "import os, time\nif os.environ.get('RANK') == '1':\n    time.sleep(1.5)\n"


@pytest.mark.slow
@pytest.mark.skipif("torchrun_overrides" not in Path(cli.__file__).read_text(),
                    reason="cli.py does not apply runtime.torchrun_overrides() yet")
def test_ranks_starting_seconds_apart_share_one_timestamped_run_dir(tmp_path: Path) -> None:
    """Without a shared stamp each rank's Hydra reads its own clock and creates its own run dir."""
    (tmp_path / "skew").mkdir()
    (tmp_path / "skew" / "sitecustomize.py").write_text(SKEW)
    path = os.pathsep.join(filter(None, [str(tmp_path / "skew"), os.environ.get("PYTHONPATH")]))
    proc = torchrun(tmp_path, "trainer.device=cpu", "trainer.max_steps_per_epoch=2", env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train" / "v3_small").iterdir())
    assert len(runs) == 1, runs
    assert json.loads((runs[0] / "summary.json").read_text())["world_size"] == 2
    assert (runs[0] / ".hydra" / "config.yaml").is_file()


def test_sync_batchnorm_needs_cuda() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match="sync_bn"):
        runtime.sync_batchnorm(model, torch.device("cpu"))


def test_single_process_world_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR", runtime.RUN_STAMP_ENV):
        monkeypatch.delenv(var, raising=False)
    world = runtime.init_world("cpu")
    assert world == runtime.World() and world.is_main
    assert runtime.torchrun_overrides() == []
    assert runtime.world_reduce({"train_acc": 0.5}, world, torch.device("cpu")) == {"train_acc": 0.5}
    assert runtime.shared_run_dir(Path("runs/a"), world) == Path("runs/a")


def test_backend_is_gloo_on_cpu_and_nccl_plus_gloo_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.dist_backend("auto") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.dist_backend("auto") == "cpu:gloo,cuda:nccl"
    assert runtime.dist_backend("cpu") == "gloo"
    monkeypatch.setenv(runtime.BACKEND_ENV, "gloo")
    assert runtime.dist_backend("cuda") == "gloo"


def test_gpu_per_rank_and_per_sweep_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv(runtime.GPU_ENV, raising=False)
    assert runtime.resolve_device("cuda") == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda", runtime.World(rank=3, size=4, local_rank=3)) == torch.device("cuda", 1)
    monkeypatch.setenv(runtime.GPU_ENV, "3")  # job 3 of a sweep on a 2-GPU machine
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)


def test_more_nccl_ranks_than_gpus_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv(runtime.BACKEND_ENV, raising=False)
    with pytest.raises(UserError, match="nproc_per_node=1"):
        runtime.resolve_device("auto", runtime.World(rank=1, size=2, local_rank=1))
    monkeypatch.setenv(runtime.BACKEND_ENV, "gloo")  # gloo may share one GPU between ranks
    assert runtime.resolve_device("cuda", runtime.World(rank=1, size=2, local_rank=1)) == torch.device("cuda", 0)


@pytest.mark.slow
def test_each_rank_distils_from_its_own_teacher_copy(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    train_run(teacher, "trainer.device=cpu", "model=v3_small", "trainer.max_steps_per_epoch=2")
    run_dir = tmp_path / "ddp_kd"
    proc = torchrun(tmp_path, "trainer.device=cpu", "trainer.max_steps_per_epoch=2", "data.batch_size=16",
                    f"distill.teacher={teacher}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["teacher"]["sha256"] and summary["teacher_s"] > 0
    # The loss of every rank needs its teacher's logits: a rank without a teacher could not step.
    assert all(row["teacher_s"] > 0 for row in metrics(run_dir))
