"""End-to-end training on synthetic data: every model, the run's files, eval, multirun, resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mobilebench.checkpoint import load_checkpoint, load_model
from mobilebench.engine import evaluate, evaluate_views
from mobilebench.models import MODEL_NAMES
from mobilebench.optim import build_optimizer, lr_factor, param_groups

from .conftest import TINY, compose_config, run_cli, train_run

METRIC_KEYS = {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_s", "train_images_per_s"}
SUMMARY_KEYS = {"model", "params", "macs", "image_size", "best_val_acc", "test_acc", "test_top5", "train_s",
                "images_per_s", "device", "precision", "torch", "seed", "world_size"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "config", "model_args", "state"}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_and_writes_its_files(name: str, tmp_path: Path) -> None:
    best = train_run(tmp_path, f"model={name}", "trainer.epochs=2", "trainer.ema=true")
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert METRIC_KEYS <= rows[0].keys()
    assert all(0.0 <= r["val_acc"] <= 1.0 and math.isfinite(r["train_loss"]) for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and summary["status"] == "completed"
    assert summary["model"] == name and summary["world_size"] == 1 and summary["params"] > 0 and summary["macs"] > 0
    assert best == summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert 0.0 <= summary["test_acc"] <= summary["test_top5"] <= 1.0
    assert summary["tta"] == "none" and summary["test_acc_tta"] is None
    for ckpt in ("last.pt", "best.pt"):
        blob = load_checkpoint(tmp_path / "checkpoints" / ckpt)
        assert CHECKPOINT_KEYS <= blob.keys()
        assert blob["config"]["model"]["name"] == name and blob["ema"] is not None
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["epoch"] == 2


def test_synthetic_is_learnable_in_one_short_epoch(tmp_path: Path) -> None:
    # ~100 steps: fewer leave BatchNorm's running statistics too far behind the weights.
    best = train_run(tmp_path, "model=v2", "data.train_subset=3072", "data.val_size=256", "data.batch_size=32",
                     "model.width_mult=0.5", "optimizer.lr=0.05")
    assert best > 0.3, f"val accuracy {best:.3f} should clearly beat chance (0.1) after one epoch"


def test_progressive_resizing_trains_small_then_full_size(tmp_path: Path) -> None:
    train_run(tmp_path, "trainer.epochs=4", "augment.min_size=16", "augment.ramp=0.5")
    sizes = [r["train_image_size"] for r in _metrics(tmp_path)]
    assert sizes == [16, 24, 32, 32]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["image_size"] == 32


def test_load_model_rebuilds_the_trained_network(tmp_path: Path) -> None:
    train_run(tmp_path, "model=v3_small", "trainer.ema=true")
    path = tmp_path / "checkpoints" / "best.pt"
    model = load_model(path)
    blob = load_checkpoint(path)
    assert not model.training
    ema_weights = {k.removeprefix("module."): v for k, v in blob["ema"].items() if k != "n_averaged"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema_weights[key]), key  # EMA weights are the ones served
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)


def test_lr_schedule_warms_up_then_follows_the_cosine() -> None:
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warm - 1] == pytest.approx(1.0)
    assert factors[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1:]))
    assert lr_factor(total, total, warm, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(25, 100, 0, "step", steps_per_epoch=5, step_size=2) == pytest.approx(0.1 ** 2)


def test_weight_decay_skips_norm_and_bias() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 0.1)
    assert {p.ndim for p in decay["params"]} == {2, 4} and decay["weight_decay"] == 0.1
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_fused_optimizer_takes_the_default_implementations_steps(name: str) -> None:
    config, _ = compose_config([f"optimizer={name}", "optimizer.weight_decay=0.01"])
    torch.manual_seed(0)
    # No conv bias before the BN: its gradient is zero up to rounding, which Adam's update would amplify.
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 9, 4))]
    models.append(copy.deepcopy(models[0]))
    start = models[0][0].weight.detach().clone()
    fast, plain = (build_optimizer(config.optimizer, m, 0.05, fused=f) for m, f in zip(models, (True, False)))
    kernel = "foreach" if name == "rmsprop" else "fused"
    assert fast.defaults[kernel] is True and not plain.defaults.get("fused") and plain.defaults["foreach"] is None
    x, y = torch.randn(16, 3, 5, 5), torch.randint(0, 4, (16,))
    for _ in range(3):
        for model, opt in zip(models, (fast, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(models[0][0].weight, start)  # the steps moved the weights


def test_flip_tta_scores_the_mean_of_an_image_and_its_mirror_logits() -> None:
    torch.manual_seed(0)
    # Not mirror-symmetric (the linear layer sees positions), so the mirror's logits differ.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 5, (40,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    with torch.no_grad():
        mean_logits = (model(x) + model(x.flip(3))) / 2
    cpu = torch.device("cpu")
    single, flipped = evaluate_views(model, batches, 5, cpu, None, "flip")
    assert flipped.acc == pytest.approx((mean_logits.argmax(1) == y).float().mean().item())
    assert flipped.loss == pytest.approx(torch.nn.functional.cross_entropy(mean_logits, y).item(), rel=1e-5)
    assert single.loss != pytest.approx(flipped.loss, rel=1e-3)  # the flip did something
    assert evaluate(model, batches, 5, cpu).loss == pytest.approx(single.loss)  # one pass scores both views
    assert model.training  # evaluate restores the mode it found


def test_cli_train_then_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_cli("train", "model=v1", *TINY, "trainer.tta=flip", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert (run / "summary.json").exists() and (run / ".hydra" / "config.yaml").exists()
    # Where the time went, with the final test pass as its own row.
    assert "where the time went" in done.stderr and "final test (+ flip TTA)" in done.stderr
    assert json.loads((run / "summary.json").read_text())["test_s"] > 0
    out = tmp_path / "eval"
    done = run_cli("eval", f"checkpoint={run}/checkpoints/best.pt", "trainer.tta=flip", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert report["test_acc"] == pytest.approx(summary["test_acc"])  # same data, same weights
    assert summary["tta"] == report["tta"] == "flip" and 0.0 <= summary["test_acc_tta"] <= 1.0
    assert report["test_acc_tta"] == pytest.approx(summary["test_acc_tta"])
    assert "with flip TTA: top-1" in done.stdout
    assert len(report["per_class_acc"]) == 10 and len(report["confusion"]) == 10
    assert sum(map(sum, report["confusion"])) == report["images"] == 64
    assert "confusion matrix" in done.stdout and "per-class accuracy" in done.stdout
    plain = tmp_path / "eval_plain"  # without TTA: the same keys, its figures null
    done = run_cli("eval", f"checkpoint={run}/checkpoints/best.pt", f"hydra.run.dir={plain}")
    assert done.returncode == 0, done.stderr
    plain_report = json.loads((plain / "eval.json").read_text())
    assert plain_report.keys() == report.keys() and plain_report["test_acc"] == report["test_acc"]
    assert plain_report["tta"] == "none" and plain_report["test_acc_tta"] is None and "TTA" not in done.stdout


def test_multirun_gives_each_job_its_own_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli("train", "-m", "model=v1,v3_small", *TINY, f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["model"] for p in summaries} == {"v1", "v3_small"}


def test_resume_auto_continues_in_the_run_dir(tmp_path: Path) -> None:
    train_run(tmp_path, "trainer.epochs=2", "trainer.max_steps_per_epoch=1")
    rows = _metrics(tmp_path)
    # A longer schedule in the same dir picks up from epoch 2 instead of starting over.
    train_run(tmp_path, "trainer.epochs=3", "trainer.max_steps_per_epoch=1", "trainer.resume=auto")
    resumed = _metrics(tmp_path)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == rows
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["step"] == 3


def test_gpu_recipe_trains_through_its_path_on_cpu(tmp_path: Path) -> None:
    # The preset's model and augmentation (cutout, one image size) and bf16, on CPU without compile,
    # shrunk to TINY's data.
    run = tmp_path / "run"
    done = run_cli("train", "experiment=cifar10_v2_gpu", *TINY, "data.batch_size=48", "trainer.device=cpu",
                   "trainer.compile=off", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "v2" and summary["precision"] == "bf16" and summary["test_acc_tta"] is not None
    assert [r["train_image_size"] for r in _metrics(run)] == [32]


def test_gpu_recipe_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_cli("train", "experiment=cifar10_v2_gpu", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
                   env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "trainer.device=cuda but no CUDA GPU is visible" in done.stderr
