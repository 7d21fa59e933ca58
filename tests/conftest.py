"""Shared fixtures: compose the real config (as the CLI does), shrunk to seconds on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from mobilebench.cli import conf_dir, to_config

# A run that finishes in a few seconds on 2 CPU cores and still exercises every part.
TINY = [
    "data=synthetic", "data.train_subset=96", "data.val_size=32", "data.test_subset=64", "data.batch_size=32",
    "trainer.epochs=1", "model.width_mult=0.25", "trainer.progress=log", "trainer.threads=1",
]


def compose_config(overrides: list[str]) -> tuple[Any, dict]:
    """The config exactly as `mobilebench` composes and validates it: (Config, plain dict)."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def train_run(run_dir: Path, *overrides: str) -> float:
    from mobilebench.train import run_train

    config, plain = compose_config([*TINY, *overrides])
    return run_train(config, plain, run_dir)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mobilebench ARGS` in a subprocess; `env` adds to (does not replace) this process's environment."""
    return subprocess.run([sys.executable, "-m", "mobilebench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture(autouse=True, scope="session")
def _native_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the native kernel into this run's temp dir, not the user's cache (subprocesses inherit it)."""
    os.environ["MOBILEBENCH_CACHE"] = str(tmp_path_factory.mktemp("mobilebench-cache"))


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """One torch thread for a module: the deploy commands give onnxruntime and ExecuTorch PyTorch's
    thread count, and one thread keeps a shared 2-core CI box responsive."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def interrupt_in_epoch(monkeypatch: pytest.MonkeyPatch, at_epoch: int, then=None) -> None:  # noqa: ANN001
    """Send the loop its own SIGTERM (or run `then`) at the first step of `at_epoch`."""
    import signal

    import mobilebench.train as train_module

    real = train_module.make_progress

    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        factory = real(*args, **kwargs)

        def make(epoch: int):  # noqa: ANN202
            step = factory(epoch)

            def update(info: dict) -> None:
                step(info)
                if epoch == at_epoch and info["step_in_epoch"] == 1:
                    then() if then else signal.raise_signal(signal.SIGTERM)
            return update
        return make

    monkeypatch.setattr(train_module, "make_progress", wrapped)
