"""The real config composes for every option, and every user mistake is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilebench.cli import conf_dir, main
from mobilebench.models import MODEL_NAMES

from .conftest import compose_config

GROUPS = ["model", "data", "augment", "optimizer", "scheduler", "trainer", "experiment", "bench", "export", "quantize", "prune"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    config, plain = compose_config([f"{group}={option}"])
    if group in ("model", "data", "optimizer", "scheduler"):
        assert getattr(config, group).name == option
    assert plain["command"] == "train"


def test_model_group_matches_the_model_names() -> None:
    assert _options("model") == sorted(MODEL_NAMES)


def test_every_section_is_a_typed_dataclass() -> None:
    from mobilebench.config import BenchConfig, ExportConfig, PruneConfig, QuantizeConfig

    config, _ = compose_config(["bench.repeats=7", "export.opset=17", "quantize.exclude=[se]", "prune.amount=0.5"])
    assert isinstance(config.bench, BenchConfig) and config.bench.repeats == 7 and config.bench.steps == 5
    assert isinstance(config.export, ExportConfig) and config.export.opset == 17
    assert isinstance(config.quantize, QuantizeConfig) and config.quantize.exclude == ["se"]
    assert isinstance(config.prune, PruneConfig) and config.prune.amount == 0.5


def test_overrides_reach_the_typed_config() -> None:
    config, _ = compose_config(["model=v2", "optimizer=adam", "optimizer.lr=0.003", "trainer.epochs=3", "data.train_subset=500"])
    assert (config.model.name, config.optimizer.name, config.optimizer.lr) == ("v2", "adam", 0.003)
    assert config.trainer.epochs == 3 and config.data.train_subset == 500
    assert config.optimizer.weight_decay == pytest.approx(1e-5)  # the tutorial's Adam


def test_seed224_switches_to_the_tutorial_pipeline() -> None:
    config, _ = compose_config(["augment=seed224"])
    assert config.augment.resize == 224 and config.model.stem == "imagenet"
    assert config.data.mean == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("override,expected", [
    ("model=v9", "model=v9 is not an option; choose one of: v1, v2, v3_large, v3_small"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("trainer.foo=1", "trainer.foo"),
    ("+trainer.foo=1", "trainer.foo"),
    ("trainer.epochs=0", "trainer.epochs=0 is out of range"),
    ("data.val_size=-1", "data.val_size=-1 is out of range"),
    ("trainer.device=tpu", "choose one of: auto, cpu, cuda, mps"),
    ("augment=fancy", "augment=fancy is not an option"),
    ("augment.min_size=48", "augment.min_size=48 is above data.image_size=32"),
    ("augment.ramp=1.5", "augment.ramp=1.5 must be a fraction"),
    ("trainer.cpu_allocator=jemalloc", "choose one of: cache, system"),
    ("trainer.tta=crops", "choose one of: none, flip"),
    ("trainer.cpu_kernels=fast", "trainer.cpu_kernels='fast' is not valid; choose one of: auto, on, off"),
    ("export.atol=0", "export.atol=0.0 is out of range; it must be > 0"),
    ("quantize.calib_method=mse", "choose one of: minmax, entropy, percentile"),
    ("prune.finetune_batch=0", "prune.finetune_batch=0 is out of range"),
    ("bench.steps=x", "bench.steps"),
])
def test_config_mistakes_are_one_line_exit_2(override: str, expected: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", override, f"hydra.run.dir={tmp_path}/run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilebench: error:") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a rejected config must not create a run dir"


def test_sweep_values_are_checked_before_any_job(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "-m", "model=v1,v9"])
    assert exit_info.value.code == 2
    assert "model=v9 is not an option" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_progressive_resizing_refuses_the_per_image_pipeline() -> None:
    from mobilebench.config import ConfigError

    with pytest.raises(ConfigError, match="needs the in-memory loader"):
        compose_config(["augment=strong", "augment.min_size=16"])


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_each_model_has_a_cifar10_recipe(model: str) -> None:
    config, _ = compose_config([f"experiment=cifar10_{model}"])
    assert config.model.name == model and config.model.stem == "cifar"
    assert config.trainer.label_smoothing > 0 and config.scheduler.warmup_epochs > 0 and config.scheduler.name == "cosine"
    assert config.augment.min_size is not None and config.optimizer.base_batch_size is not None
    # CIFAR-10's usual protocol: all 50,000 training images, single-view test_acc with the flip TTA beside it.
    assert config.data.val_size == 0 and config.trainer.tta == "flip"


def test_the_gpu_recipe_keeps_data_on_the_gpu_and_compiles() -> None:
    config, _ = compose_config(["experiment=cifar10_v2_gpu"])
    assert config.model.name == "v2" and config.trainer.device == "cuda" and config.trainer.compile == "on"
    assert config.data.device_resident == "on" and config.trainer.precision == "bf16"
    # One image size, so compile traces one training graph; the CPU recipes' protocol otherwise.
    assert config.augment.min_size is None and config.augment.cutout > 0
    assert config.data.val_size == 0 and config.trainer.tta == "flip" and config.optimizer.base_batch_size == 128
