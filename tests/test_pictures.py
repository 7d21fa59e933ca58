"""The PNGs of train, eval and bench: written where users look, drawn from the run's own figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report extra is not installed")

from PIL import Image  # noqa: E402

from mobilebench import pictures  # noqa: E402
from mobilebench.cli import main  # noqa: E402
from tests.conftest import TINY, run_cli  # noqa: E402
from tests.test_bench import TINY_BENCH  # noqa: E402


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pictures") / "train"
    done = run_cli("train", *TINY, "trainer.epochs=3", "trainer.max_steps_per_epoch=2", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    return run


def test_train_draws_its_curves_and_final_test(trained: Path) -> None:
    width, height = _png_size(trained / "curves.png")
    assert width > 1000 and height > 300
    for name in ("confusion.png", "per_class.png"):
        assert _png_size(trained / name)[0] > 300
    report = json.loads((trained / "eval.json").read_text())
    assert report["test_acc"] == pytest.approx(json.loads((trained / "summary.json").read_text())["test_acc"])


def test_curves_plot_the_metrics_rows(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    fig = pictures.curves(rows + [{"epoch": 3, "interrupted": True}], "t", {"test_acc": 0.5})
    loss, acc, lr = fig.axes
    assert list(loss.lines[0].get_ydata()) == pytest.approx([r["train_loss"] for r in rows])
    assert list(loss.lines[1].get_ydata()) == pytest.approx([r["val_loss"] for r in rows])
    assert list(acc.lines[1].get_ydata()) == pytest.approx([100 * r["val_acc"] for r in rows])
    assert list(acc.lines[2].get_ydata()) == [50.0]  # the test figure, at the last epoch
    assert list(lr.lines[0].get_xdata()) == [1, 2, 3] and list(lr.lines[0].get_ydata()) == [r["lr"] for r in rows]
    assert loss.get_ylabel() and acc.get_ylabel() == "top-1 accuracy (%)" and lr.get_xlabel() == "epoch"


def test_confusion_rows_are_normalized_and_labelled_with_class_names() -> None:
    classes = ["cat", "dog", "ship"]
    fig = pictures.confusion(classes, [[8, 2, 0], [1, 1, 0], [0, 0, 5]], "t")
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.sum(1).tolist() == pytest.approx([100, 100, 100])
    assert image[0].tolist() == pytest.approx([80, 20, 0])
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    assert [t.get_text() for t in ax.get_yticklabels()] == classes


def test_per_class_bars_are_the_accuracies() -> None:
    fig = pictures.per_class(["a", "b"], [0.25, 1.0], [4, 3], 0.57, "t")
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == pytest.approx([25.0, 100.0])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (n=4)", "b (n=3)"]


def test_eval_writes_both_pictures(trained: Path, tmp_path: Path) -> None:
    done = run_cli("eval", f"checkpoint={trained}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert _png_size(tmp_path / "confusion.png")[1] > 300 and _png_size(tmp_path / "per_class.png")[0] > 300


def test_bench_draws_both_sides(tmp_path: Path) -> None:
    main(["bench", "train", *TINY_BENCH, f"hydra.run.dir={tmp_path}"])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert _png_size(tmp_path / "bench.png")[0] > 500
    data, train = pictures.bench(result).axes
    assert [p.get_height() for p in train.patches] == pytest.approx(
        [result["train_images_per_s"], result["train_baseline_images_per_s"]])
    assert [p.get_height() for p in data.patches] == pytest.approx(
        [result["data_images_per_s"], result["data_baseline_images_per_s"]])


def test_without_matplotlib_a_run_notes_it_once_and_draws_nothing(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    run = tmp_path / "run"
    done = run_cli("train", *TINY, "trainer.max_steps_per_epoch=1", f"hydra.run.dir={run}",
                   env={"PYTHONPATH": str(fake.parent)})
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "matplotlib is not installed" in line]
    assert notes == ["mobilebench: note: no confusion.png or other PNGs (matplotlib is not installed; "
                     "pip install 'mobilebench[report]')"]
    assert not list(run.glob("*.png")) and json.loads((run / "summary.json").read_text())["status"] == "completed"
