"""`mobilebench report`: rows, seed aggregation, statuses, data checks, deploy numbers and plots."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mobilebench.report import run_report as main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, *, model: str = "v3_small", seed: int = 0, status: str = "completed",
             test_acc: float | None = 0.5, best_val: float | None = 0.5, data: str = "synthetic", epochs: int = 2,
             epochs_done: int | None = None, lr: float = 0.1, data_root: str = "unused",
             test_acc_tta: float | None = None) -> Path:
    """A run dir shaped like `mobilebench train` leaves it: summary.json, metrics.jsonl, .hydra/config.yaml."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    done = epochs if epochs_done is None else epochs_done
    config = {"command": "train", "checkpoint": None,
              "model": {"name": model, "width_mult": 1.0, "stem": "cifar", "dropout": None, "hidden_channels": None},
              "data": {"name": data, "root": data_root, "train_subset": 256, "image_size": 32, "batch_size": 32},
              "optimizer": {"name": "sgd", "lr": lr},
              "trainer": {"epochs": epochs, "seed": seed, "device": "auto", "threads": None, "label_smoothing": 0.1}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    finished = status == "completed"
    summary = {"status": status, "model": model, "width_mult": 1.0, "stem": "cifar", "data": data,
               "params": 1_000_000, "macs": 17_000_000, "image_size": 32, "epochs": epochs, "batch_size": 32,
               "global_batch_size": 32, "train_images": 256, "val_images": 64, "test_images": 64, "device": "cpu",
               "precision": "fp32", "torch": "2.x", "seed": seed, "world_size": 1, "threads": 2,
               "best_val_acc": best_val if finished else None, "test_acc": test_acc if finished else None,
               "train_s": 120.0 if finished else None, "images_per_s": 100.0 if finished else None,
               "tta": "flip" if test_acc_tta is not None else "none", "test_acc_tta": test_acc_tta}
    if status != "running":
        summary["epochs_done"] = done
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"epoch": e, "train_loss": 2.0 - 0.3 * e, "val_acc": (best_val or 0.1) * e / max(done, 1)}
             for e in range(1, done + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def read_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert 1_000 < len(data) < 200_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width >= 400 and height >= 300


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun dir: two seeds of v1 and of v3_small, a failed v2 and a still-running v3_large."""
    root = tmp_path / "multirun"
    make_run(root, "0_v1", model="v1", seed=0, test_acc=0.60, best_val=0.62)
    make_run(root, "1_v1", model="v1", seed=1, test_acc=0.70, best_val=0.66)
    make_run(root, "2_v2", model="v2", seed=0, status="failed", epochs_done=1, best_val=0.3)
    make_run(root, "3_v3_small", model="v3_small", seed=0, test_acc=0.50)
    make_run(root, "4_v3_small", model="v3_small", seed=1, test_acc=0.54)
    make_run(root, "5_v3_large", model="v3_large", status="running", epochs_done=1, best_val=0.2)
    return root


def test_rows_mean_std_statuses_and_pngs(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0

    rows = read_csv(out)
    assert [(r["model"], r["status"], r["n"]) for r in rows] == [
        ("v1", "completed", "2"), ("v2", "failed", "1"), ("v3_small", "completed", "2"), ("v3_large", "running", "1")]
    v1 = rows[0]
    assert float(v1["test_acc_mean"]) == pytest.approx(65.0)
    assert float(v1["test_acc_std"]) == pytest.approx(100 * statistics.stdev([0.60, 0.70]), abs=1e-3)
    assert float(v1["best_val_acc_mean"]) == pytest.approx(64.0)
    assert v1["seeds"] == "0,1" and v1["train_min_mean"] == "2.0"
    assert float(v1["macs_224_m"]) == pytest.approx(2270.875648, rel=1e-4)  # v1 with its cifar stem at 224px
    assert float(rows[2]["test_acc_std"]) == pytest.approx(100 * statistics.stdev([0.50, 0.54]), abs=1e-3)
    assert rows[1]["test_acc_mean"] == "" and float(rows[1]["best_val_acc_mean"]) == pytest.approx(30.0)

    md = (out / "report.md").read_text()
    assert "65.00 ± 7.07" in md and "52.00 ± 2.83" in md
    assert "failed (1/2 epochs)" in md and "| running" in md
    assert "![curves.png](curves.png)" in md and "![pareto.png](pareto.png)" in md
    assert_png(out / "curves.png")
    assert_png(out / "pareto.png")
    printed = capsys.readouterr().out
    assert "65.00 ± 7.07" in printed and "v3_large" in printed


def test_flip_tta_column_only_when_runs_report_it(sweep: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    assert main([str(sweep), "--out", str(plain)]) == 0
    assert "flip TTA" not in (plain / "report.md").read_text() and read_csv(plain)[0]["test_acc_tta_mean"] == ""
    root = tmp_path / "tta"
    make_run(root, "0_v1", model="v1", seed=0, test_acc=0.60, test_acc_tta=0.63)
    make_run(root, "1_v1", model="v1", seed=1, test_acc=0.70, test_acc_tta=0.71)
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    (row,) = read_csv(out)
    assert float(row["test_acc_tta_mean"]) == pytest.approx(67.0) and float(row["test_acc_mean"]) == pytest.approx(65.0)
    md = (out / "report.md").read_text()
    assert "| test acc, flip TTA (%) |" in md and "67.00 ± 5.66" in md


def test_runs_differing_in_recipe_get_separate_labelled_rows(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "a", model="v2", seed=0, lr=0.1, test_acc=0.4)
    make_run(root, "b", model="v2", seed=1, lr=0.1, test_acc=0.5)
    make_run(root, "c", model="v2", seed=0, lr=0.05, test_acc=0.3)
    out = tmp_path / "report"
    assert main([str(root / "a"), str(root / "b"), str(root / "c"), "--out", str(out)]) == 0
    rows = read_csv(out)
    assert sorted((r["config"], r["n"]) for r in rows) == [("lr=0.05", "1"), ("lr=0.1", "2")]
    assert "| config |" in (out / "report.md").read_text()


def test_a_key_missing_from_an_older_run_counts_as_its_default(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "old", model="v2", seed=0, test_acc=0.4)
    new = make_run(root, "new", model="v2", seed=1, test_acc=0.5)
    config = yaml.safe_load((new / ".hydra" / "config.yaml").read_text())
    config["augment"] = {"min_size": None, "size_step": 4}  # keys added to the schema after "old" ran
    (new / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    assert [r["n"] for r in read_csv(out)] == ["2"]
    config["augment"]["size_step"] = 8  # a real difference still splits the row
    (new / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(root), "--out", str(tmp_path / "report2")]) == 0
    assert sorted(r["config"] for r in read_csv(tmp_path / "report2")) == ["augment.size_step=4", "augment.size_step=8"]


def test_run_dir_without_summary_is_listed_not_dropped(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    make_run(root, "0_v1", model="v1")
    crashed = make_run(root, "1_v2", model="v2")
    (crashed / "summary.json").unlink()
    (crashed / "metrics.jsonl").unlink()
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    assert [(r["model"], r["status"]) for r in read_csv(out)] == [("v1", "completed"), ("v2", "not started")]


def test_mixed_data_sets_are_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    make_run(root, "a", data="synthetic")
    make_run(root, "b", data="imagefolder", data_root="/data/cifar10-jpeg")
    assert main([str(root), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilebench: error: runs on different data sets") and err.count("\n") == 1
    assert "--allow-mixed-data" in err and not (tmp_path / "no").exists()

    out = tmp_path / "mixed"
    assert main([str(root), "--out", str(out), "--allow-mixed-data"]) == 0
    assert sorted(r["config"] for r in read_csv(out)) == ["data=imagefolder:/data/cifar10-jpeg", "data=synthetic"]


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_bad_paths_give_one_line_and_exit_2(tmp_path: Path, make_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(make_path(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilebench: error: ") and err.count("\n") == 1
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("mobilebench: error: ")


def test_without_matplotlib_tables_are_written_with_a_hint(sweep: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and len(read_csv(out)) == 4
    assert not (out / "curves.png").exists() and not (out / "pareto.png").exists()
    assert "pip install 'mobilebench[report]'" in capsys.readouterr().err
    assert "curves.png" not in (out / "report.md").read_text()


def write_json(path: Path, blob: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob))


def test_quantize_and_latency_reports_fill_their_columns(sweep: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "outputs"
    ckpt = lambda run: str(sweep / run / "checkpoints" / "best.pt")  # noqa: E731
    # The layouts mobilebench.deploy writes: static and dynamic quantize, bench latency; plus fields
    # the report does not know and an older flat latency file.
    write_json(deploy / "quantize/a/quantize.json", {
        "checkpoint": ckpt("0_v1"), "method": "static", "files": {"int8": "model.int8.onnx"}, "future": [1, 2],
        "accuracy": {"pytorch_fp32": 0.60, "onnx_fp32": 0.60, "onnx_int8": 0.59, "drop_points": 1.0},
        "latency": {"1": {"onnx_fp32": {"median_ms": 2.0}, "onnx_int8": {"median_ms": 1.0}},
                    "32": {"onnx_fp32": {"median_ms": 20.0}, "onnx_int8": {"median_ms": 9.0}}}})
    write_json(deploy / "quantize/b/quantize.json", {
        "checkpoint": ckpt("1_v1"), "method": "dynamic",
        "accuracy": {"pytorch_fp32": 0.70, "pytorch_dynamic_int8": 0.69, "drop_points": 1.0}})
    write_json(deploy / "bench/c/latency.json", {
        "checkpoint": ckpt("3_v3_small"), "results": {
            "pytorch": {"1": {"median_ms": 4.5}}, "onnx_fp32": {"1": {"median_ms": 3.0}},
            "onnx_int8": {"1": {"median_ms": 1.5}, "32": {"median_ms": 12.0}}}})
    write_json(deploy / "bench/d/latency.json", {"checkpoint": ckpt("4_v3_small"), "latency_ms": 5.0})
    write_json(deploy / "bench/e/latency.json", {"checkpoint": "/elsewhere/best.pt", "latency_ms": 99.0})

    out = tmp_path / "report"
    assert main([str(sweep), str(deploy), "--out", str(out)]) == 0
    rows = {r["model"]: r for r in read_csv(out)}
    v1, v3s = rows["v1"], rows["v3_small"]
    assert float(v1["int8_test_acc_mean"]) == pytest.approx(64.0)
    assert float(v1["int8_drop_pts"]) == pytest.approx(1.0)
    assert (float(v1["latency_ms_mean"]), float(v1["int8_latency_ms_mean"]), v1["latency_batch"]) == (2.0, 1.0, "1")
    assert float(v3s["latency_ms_mean"]) == pytest.approx(4.0) and float(v3s["int8_latency_ms_mean"]) == 1.5
    assert v3s["latency_backend"] == "onnx_fp32" and v3s["int8_test_acc_mean"] == ""
    assert rows["v2"]["latency_ms_mean"] == "" and rows["v2"]["int8_test_acc_mean"] == ""
    md = (out / "report.md").read_text()
    for column in ("int8 acc (%)", "int8 drop (pts)", "latency fp32 (ms)", "latency int8 (ms)"):
        assert f"| {column} |" in md
    assert "/elsewhere" not in md
    assert_png(out / "pareto.png")


@pytest.mark.slow
def test_compare_sweep_then_report_end_to_end(tmp_path: Path) -> None:
    """The compare preset trains two seeds in one multirun; the report makes them one row."""
    sweep_dir = tmp_path / "sweep"
    train = ["mobilebench", "train", "-m", "experiment=compare", "data=synthetic", "model=v3_small",
             "model.width_mult=0.25", "trainer.seed=0,1", "trainer.epochs=1", "data.train_subset=64",
             "data.val_size=32", "data.test_subset=32", "data.batch_size=32", "trainer.threads=1",
             f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load((sweep_dir / "0_v3_small" / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["label_smoothing"] == 0.1 and config["scheduler"]["warmup_epochs"] == 1.0
    assert config["optimizer"]["nesterov"] is True and config["model"]["name"] == "v3_small"

    out = tmp_path / "report"
    done = subprocess.run(["mobilebench", "report", str(sweep_dir), "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = read_csv(out)
    assert (row["model"], row["status"], row["n"], row["seeds"]) == ("v3_small", "completed", "2", "0,1")
    assert row["test_acc_std"] != "" and 0 <= float(row["test_acc_mean"]) <= 100
    assert "v3_small" in done.stdout
    assert_png(out / "curves.png")
