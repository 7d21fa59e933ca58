"""Experiment trackers for `train`: TensorBoard event files and MLflow runs, both optional.

The run's own files (metrics.jsonl, summary.json, checkpoints) are the record; a tracker is a
copy for the tools people browse runs in. So a tracker that fails (store unwritable, disk full,
server gone) says so in one line and is dropped, and training goes on. Only the main rank tracks.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mobilebench.config import LoggerConfig, MlflowConfig, TensorBoardConfig
from mobilebench.errors import UserError
from mobilebench.runfiles import write_json_atomic

log = logging.getLogger("mobilebench")
INSTALL_HINT = "pip install 'mobilebench[track]'"
MLFLOW_RUN_FILE = "mlflow_run.json"  # lets trainer.resume=auto continue the same MLflow run
# What the per-step and per-epoch records are called in both trackers.
STEP_KEYS = {"loss": "train/loss", "acc": "train/acc", "lr": "train/lr", "images_per_s": "train/images_per_s"}
EPOCH_KEYS = {"train_loss": "epoch/train_loss", "train_acc": "epoch/train_acc", "val_loss": "epoch/val_loss",
              "val_acc": "epoch/val_acc", "val_top5": "epoch/val_top5", "lr": "epoch/lr",
              "train_images_per_s": "epoch/images_per_s", "epoch_s": "epoch/seconds", "epoch": "epoch/epoch"}
TEST_KEYS = {"test_acc": "test/acc", "test_top5": "test/top5", "test_loss": "test/loss", "test_acc_tta": "test/acc_tta",
             "best_val_acc": "test/best_val_acc"}


def _require(module: str, logger: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logger={logger} needs {module.split('.')[0]}, which is not installed; "
                        f"install it with: {INSTALL_HINT}") from None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become text (what both trackers accept)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def numbers(row: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, float]:
    return {tag: float(row[key]) for key, tag in names.items() if isinstance(row.get(key), (int, float))}


class TensorBoard:
    name = "tensorboard"
    every_step = True  # also gets the per-step train curves (MLflow keeps to per-epoch figures)

    def __init__(self, cfg: TensorBoardConfig, run_dir: Path, resume_step: int | None) -> None:
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.dir = run_dir / cfg.log_dir
        # purge_step: a resumed run drops the steps the stopped one logged past its checkpoint,
        # so no step appears twice.
        self.writer = tb.SummaryWriter(log_dir=str(self.dir), purge_step=resume_step)

    def start(self, config: Mapping[str, Any]) -> None:
        log.info("TensorBoard: events in %s (view: tensorboard --logdir %s)", self.dir, self.dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, status: str, config: Mapping[str, Any], test: Mapping[str, float], files: list[Path],
               step: int) -> None:
        if test:  # "." keeps the hparams in this run's dir rather than a new one
            self.writer.add_hparams(flatten(config), dict(test), run_name=".", global_step=step)
        self.writer.close()


class MLflow:
    name = "mlflow"
    every_step = False

    def __init__(self, cfg: MlflowConfig, run_dir: Path, resumed: bool) -> None:
        from mlflow.tracking import MlflowClient  # open_trackers checked that it is installed

        # mlflow's and alembic's own log lines (table creation, migrations, retries on a failing store)
        # stay off the terminal: a problem reaches the user as Tracking's one warning line.
        for name in ("mlflow", "alembic"):  # a level, not `disabled`: their child loggers inherit it
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)

        self.uri = cfg.tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        previous = read_run_file(run_dir) if resumed else None
        self.new_run = not (previous and previous.get("tracking_uri") == self.uri)
        if not self.new_run:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(cfg.experiment_name)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment(cfg.experiment_name)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or mlflow_run_name(run_dir),
                                         tags={"mobilebench.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
        write_json_atomic(run_dir / MLFLOW_RUN_FILE, {"tracking_uri": self.uri, "run_id": self.run_id})

    def _create_experiment(self, name: str) -> str:
        # Artifacts beside a local store rather than in ./mlruns of whatever dir the run started in.
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if self.new_run:  # a resumed run keeps its params (MLflow refuses to change one)
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for chunk in _chunks(params, 100):
                self.client.log_batch(self.run_id, params=chunk)
        log.info("MLflow: run %s in %s (view: mlflow ui --backend-store-uri %s)", self.run_id, self.uri, self.uri)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, status: str, config: Mapping[str, Any], test: Mapping[str, float], files: list[Path],
               step: int) -> None:
        if test:
            self.log(test, step)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def default_tracking_uri() -> str:
    return f"sqlite:///{(Path.cwd() / 'outputs' / 'mlflow.db').resolve()}"


def mlflow_run_name(run_dir: Path) -> str:
    """outputs/train/v3_small/2026-12-02_10-00-00 -> train/v3_small/2026-12-02_10-00-00."""
    parts = run_dir.resolve().parts
    return "/".join(parts[parts.index("outputs") + 1 :]) if "outputs" in parts[:-1] else run_dir.name


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / MLFLOW_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


class Tracking:
    """The trackers of one run; each call goes to every tracker still working."""

    def __init__(self, trackers: list[Any], log_every: int) -> None:
        self.trackers, self.log_every = trackers, log_every
        self.last_step = 0  # the test figures are logged at the run's last step

    def _call(self, method: str, *args: Any, steps_only: bool = False) -> None:
        for tracker in [t for t in self.trackers if t.every_step or not steps_only]:
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # any failure of a tracker must not cost the run
                self.trackers.remove(tracker)
                _warn(f"{tracker.name} logging stopped", err)

    def start(self, config: Mapping[str, Any]) -> None:
        self._call("start", config)

    def step(self, info: Mapping[str, float], steps: int) -> None:
        """Every log_every steps of an epoch and at its last step, as the log lines are."""
        at = int(info["step_in_epoch"])
        if any(t.every_step for t in self.trackers) and (at % self.log_every == 0 or at == steps):
            row = {**info, "images_per_s": info["images"] / max(info["seconds"], 1e-9)}
            self._call("log", numbers(row, STEP_KEYS), int(info["step"]), steps_only=True)

    def epoch(self, row: Mapping[str, Any]) -> None:
        if self.trackers and not row.get("interrupted"):
            self.last_step = int(row["step"])
            self._call("log", numbers(row, EPOCH_KEYS), self.last_step)

    def finish(self, status: str, config: Mapping[str, Any], summary: Mapping[str, Any], files: list[Path]) -> None:
        self._call("finish", status, config, numbers(summary, TEST_KEYS), files, self.last_step)


def require_libraries(cfg: LoggerConfig) -> None:
    if cfg.tensorboard is not None:
        _require("torch.utils.tensorboard", "tensorboard")
    if cfg.mlflow is not None:
        _require("mlflow", "mlflow")


def open_trackers(cfg: LoggerConfig, run_dir: Path, resume_step: int | None, log_every: int, is_main: bool) -> Tracking:
    """The trackers `cfg` turns on (none on other ranks). A missing library is a user mistake
    (one line, exit 2); a tracker that cannot start is dropped with a warning, like one failing later."""
    tracking = Tracking([], log_every)
    if not is_main:
        return tracking
    require_libraries(cfg)
    makers = []
    if cfg.tensorboard is not None:
        makers.append(("tensorboard", lambda: TensorBoard(cfg.tensorboard, run_dir, resume_step)))
    if cfg.mlflow is not None:
        makers.append(("mlflow", lambda: MLflow(cfg.mlflow, run_dir, resume_step is not None)))
    for name, make in makers:
        try:
            tracking.trackers.append(make())
        except Exception as err:
            _warn(f"{name} logging could not start", err)
    return tracking


def _warn(what: str, err: Exception) -> None:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    sys.stderr.write(f"mobilebench: warning: {what} ({type(err).__name__}: {reason}); training goes on, "
                     "metrics.jsonl, summary.json and the checkpoints are still written\n")
