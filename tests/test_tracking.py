"""logger=tensorboard / logger=mlflow: the real event files and a real local MLflow store, read back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the track extra is not installed")
pytest.importorskip("mlflow", reason="the track extra is not installed")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from mobilebench.errors import UserError  # noqa: E402
from mobilebench.tracking import flatten, open_trackers  # noqa: E402
from tests.conftest import compose_config, interrupt_in_epoch, run_cli, train_run  # noqa: E402

RUN = ["data.train_subset=192", "trainer.epochs=2", "trainer.log_every=2", "logger=[tensorboard,mlflow]"]


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()  # purges steps a resumed run re-logged, as TensorBoard itself does
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _hparams(run_dir: Path) -> dict[str, object]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_run(run_dir: Path, uri: str):  # noqa: ANN202
    client = MlflowClient(uri)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def test_both_loggers_record_the_run_as_its_own_files_do(tmp_path: Path) -> None:
    run_dir, uri = tmp_path / "run", _uri(tmp_path)
    train_run(run_dir, *RUN, f"logger.mlflow.tracking_uri={uri}")
    rows, summary = _metrics(run_dir), json.loads((run_dir / "summary.json").read_text())

    scalars = _scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]  # every log_every steps
    assert [s for s, _ in scalars["epoch/val_acc"]] == [r["step"] for r in rows] == [6, 12]
    assert [v for _, v in scalars["epoch/train_loss"]] == pytest.approx([r["train_loss"] for r in rows])
    assert scalars["test/acc"] == [(12, pytest.approx(summary["test_acc"]))]
    hp = _hparams(run_dir)
    assert hp["trainer.epochs"] == 2 and hp["model.name"] == "v3_small" and hp["data.train_subset"] == 192

    client, run = _mlflow_run(run_dir, uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["logger.mlflow.tracking_uri"] == uri
    history = client.get_metric_history(run.info.run_id, "epoch/val_acc")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["val_acc"])) for r in rows]
    assert run.data.metrics["test/acc"] == pytest.approx(summary["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "eval.json", "curves.png", "confusion.png", "per_class.png"} <= artifacts


def test_sigterm_marks_the_run_killed_and_resume_continues_it_without_duplicate_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, run_dir, uri = tmp_path / "whole", tmp_path / "run", _uri(tmp_path)
    train_run(whole, *RUN, f"logger.mlflow.tracking_uri={uri}")
    interrupt_in_epoch(monkeypatch, at_epoch=2)
    with pytest.raises(UserError, match="interrupted by SIGTERM"):
        train_run(run_dir, *RUN, f"logger.mlflow.tracking_uri={uri}")
    _, killed = _mlflow_run(run_dir, uri)
    assert killed.info.status == "KILLED"
    monkeypatch.undo()
    train_run(run_dir, *RUN, f"logger.mlflow.tracking_uri={uri}", "trainer.resume=auto")
    client, resumed = _mlflow_run(run_dir, uri)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert len(client.search_runs([resumed.info.experiment_id])) == 2  # this one and `whole`, no third
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "epoch/train_loss")]
    assert steps == [6, 12]
    # TensorBoard: each step once, and the same steps and values as the run never stopped.
    got, want = _scalars(run_dir), _scalars(whole)
    for tag in ("train/loss", "epoch/train_loss", "epoch/val_acc"):
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]]), tag


def test_a_store_that_breaks_mid_run_costs_one_line_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    run_dir, uri = tmp_path / "run", _uri(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    # An earlier in-process CLI call leaves Hydra's root log handler on a capture stream pytest has
    # since closed; writing to it prints "--- Logging error ---" tracebacks that are not the run's.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    def corrupt_the_store() -> None:  # what a full or failing disk leaves behind
        size = db.stat().st_size
        with db.open("r+b") as f:
            f.write(b"\0" * size)

    interrupt_in_epoch(monkeypatch, at_epoch=2, then=corrupt_the_store)
    train_run(run_dir, *RUN, f"logger.mlflow.tracking_uri={uri}")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "mlflow logging stopped" in line]
    assert len(warnings) == 1 and warnings[0].startswith("mobilebench: warning:"), err
    assert "Traceback" not in err
    assert [r["epoch"] for r in _metrics(run_dir)] == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert [s for s, _ in _scalars(run_dir)["epoch/val_acc"]] == [6, 12]  # TensorBoard carried on


def test_a_store_that_cannot_be_opened_warns_and_training_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store's folder should be")
    train_run(tmp_path / "run", "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{blocker}/mlflow.db")
    err = capsys.readouterr().err
    assert sum("mlflow logging could not start" in line for line in err.splitlines()) == 1, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_without_the_extra_train_stops_in_one_line_naming_it(tmp_path: Path) -> None:
    fake = tmp_path / "site"
    (fake / "mlflow").mkdir(parents=True)
    (fake / "mlflow" / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    result = run_cli("train", "data=synthetic", "data.train_subset=64", "data.test_subset=32", "trainer.epochs=1",
                     "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}",
                     env={"PYTHONPATH": str(fake)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("mobilebench: error: logger=mlflow needs mlflow, which is not installed; "
                         "install it with: pip install 'mobilebench[track]'")
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_each_multirun_job_is_its_own_tensorboard_dir_and_mlflow_run(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    result = run_cli("train", "-m", "data=synthetic", "data.train_subset=64", "data.val_size=16", "data.test_subset=32",
                     "data.batch_size=32", "model.width_mult=0.25", "trainer.threads=1", "trainer.seed=0,1",
                     "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr
    jobs = sorted((tmp_path / "sweep").glob("*_v3_small"))
    assert len(jobs) == 2 and all(list((j / "tensorboard").glob("events.out.tfevents.*")) for j in jobs)
    ids = {json.loads((j / "mlflow_run.json").read_text())["run_id"] for j in jobs}
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mobilebench").experiment_id])
    assert {r.info.run_id for r in runs} == ids and len(ids) == 2
    assert sorted(r.data.params["trainer.seed"] for r in runs) == ["0", "1"]


def test_only_the_main_rank_tracks(tmp_path: Path) -> None:
    config, _ = compose_config(["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={_uri(tmp_path)}"])
    assert open_trackers(config.logger, tmp_path / "rank1", None, 10, is_main=False).trackers == []
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "store").exists()
    assert [t.name for t in open_trackers(config.logger, tmp_path / "rank0", None, 10, is_main=True).trackers] == \
        ["tensorboard", "mlflow"]


def test_flatten_gives_dotted_keys_and_text_for_lists_and_none() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "null", "e": "x"}
