"""Hydra plugins as config options: joblib parallel sweeps, the SLURM preset, the Optuna search."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import TINY, run_cli

SMOKE = [*TINY, "trainer.max_steps_per_epoch=2"]
NO_VAL = [*(o for o in SMOKE if not o.startswith("data.val_size=")), "data.val_size=0"]


def mobilebench(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", *args, cwd=cwd, env=env)


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


@pytest.mark.slow
def test_joblib_runs_two_sweep_jobs_at_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = mobilebench("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       "+hydra.job.env_set.MOBILEBENCH_GPU=${hydra:job.num}",  # the documented one-GPU-per-job form
                       "optimizer.lr=0.01,0.02", *SMOKE, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(sweep)
    assert list(runs) == ["0_v3_small", "1_v3_small"]
    assert all(s["status"] == "completed" and s["world_size"] == 1 for s in runs.values())
    lrs = {yaml.safe_load((sweep / name / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] for name in runs}
    assert lrs == {0.01, 0.02}
    # Hydra writes .hydra/ when a job starts, summary.json last: the two jobs overlap in time.
    start = {n: (sweep / n / ".hydra" / "config.yaml").stat().st_mtime for n in runs}
    end = {n: (sweep / n / "summary.json").stat().st_mtime for n in runs}
    assert start["0_v3_small"] < end["1_v3_small"] and start["1_v3_small"] < end["0_v3_small"]


@pytest.mark.slow
def test_optuna_search_maximises_validation_accuracy(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    smoke = [o for o in SMOKE if not o.startswith("model.width_mult=")]
    proc = mobilebench("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *smoke,
                       "model.width_mult=choice(0.25, 0.35)", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(sweep)
    assert len(runs) == 2 and all(s["status"] == "completed" for s in runs.values())
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "trainer.label_smoothing",
                                          "model.width_mult"}
    assert result["best_value"] == pytest.approx(max(s["best_val_acc"] for s in runs.values()))
    for name in runs:
        cfg = yaml.safe_load((sweep / name / ".hydra" / "config.yaml").read_text())
        assert 1e-4 <= cfg["optimizer"]["lr"] <= 0.3 and 1e-6 <= cfg["optimizer"]["weight_decay"] <= 1e-2
        assert 0.0 <= cfg["trainer"]["label_smoothing"] <= 0.2 and cfg["model"]["width_mult"] in (0.25, 0.35)


def test_optuna_search_refuses_to_tune_on_the_test_set(tmp_path: Path) -> None:
    """Without a validation split a job returns test accuracy; a search must not maximise that."""
    sweep = tmp_path / "sweep"
    proc = mobilebench("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *NO_VAL,
                       f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("mobilebench: error: data.val_size=0 leaves no validation")
    assert "Traceback" not in proc.stderr
    assert not list(sweep.glob("*/summary.json"))  # refused before training


def test_grid_sweep_without_validation_split_trains_and_reports_test(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = mobilebench("-m", "optimizer.lr=0.01", *NO_VAL, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = summaries(sweep).values()
    assert run["status"] == "completed" and run["best_val_acc"] is None and run["test_acc"] is not None


@pytest.mark.slow
def test_submitit_tasks_of_one_job_train_as_ddp_ranks(tmp_path: Path) -> None:
    """The SLURM path without SLURM: submitit's local executor sets the same per-task environment."""
    sweep = tmp_path / "sweep"
    proc = mobilebench("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                       "hydra.launcher.timeout_min=5", *SMOKE, "trainer.device=cpu", "data.batch_size=16", f"hydra.sweep.dir={sweep}",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = summaries(sweep)
    assert list(runs) == ["0_v3_small"]
    run = runs["0_v3_small"]
    assert (run["status"], run["world_size"], run["global_batch_size"]) == ("completed", 2, 32)


def test_slurm_preset_sets_partition_time_and_gpus(tmp_path: Path) -> None:
    proc = mobilebench("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                       "hydra.launcher.tasks_per_node=4", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["timeout_min"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (
        "gpu", 240, 4, 4)


@pytest.mark.parametrize("args", [["hparams_search=optuna"], ["-m", "hydra/launcher=joblib"],
                                  ["-m", "hydra/launcher=slurm"]])
def test_missing_plugin_is_one_line_with_the_install_command(args: list[str], tmp_path: Path) -> None:
    # A regular `hydra_plugins` package first on the path hides the installed plugins (a
    # namespace package), as if they were not installed.
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = mobilebench(*args, "data=synthetic", cwd=tmp_path, env={"PYTHONPATH": path})
    assert proc.returncode == 2
    assert "pip install 'mobilebench[scale]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
