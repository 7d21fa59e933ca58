"""`mobilebench predict`: the same class as eval for the same image, from a checkpoint, its ONNX
export and its int8 model; any PIL image mode and size; unreadable files named and skipped; one-line
errors for every user mistake.

One tiny v1 is trained per module (8 short epochs on synthetic 32x32 data: confident enough that
its int8 model agrees with it) and its test split is written out as lossless PNG files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mobilebench.checkpoint import checkpoint_data_config, load_model_and_checkpoint, save_checkpoint
from mobilebench.data import Split, decode_image, load_data
from mobilebench.errors import UserError
from mobilebench.loader import eval_batches
from mobilebench.predict import run_predict

from .conftest import compose_config, run_cli, train_run

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TRAIN = ["model=v1", "data.train_subset=512", "data.val_size=64", "data.test_subset=200", "trainer.epochs=8"]
QUICK_EXPORT = ["export.exporter=torchscript", "export.parity_images=64"]
QUICK_QUANTIZE = ["quantize.exporter=torchscript", "quantize.calib_size=128", "quantize.test_images=64",
                  "quantize.repeats=2", "quantize.warmup=1", "quantize.latency_batches=[1]"]


def eval_top1(checkpoint: Path, x: torch.Tensor, resize: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Per-image top-1 and softmax exactly as `mobilebench eval` computes them (run_eval's code path)."""
    model, blob = load_model_and_checkpoint(checkpoint, "cpu")
    model = model.to(memory_format=torch.channels_last)  # trainer.channels_last defaults to true, as in eval
    stats = blob["data"]
    split = Split(x, torch.zeros(len(x), dtype=torch.int64))
    with torch.no_grad():
        logits = torch.cat([model(b).float() for b, _ in eval_batches(split, 128, stats["mean"], stats["std"],
                                                                        torch.device("cpu"), True, resize)])
    return logits.argmax(1).tolist(), torch.softmax(logits.double(), 1)


def predict(checkpoint: Path, inputs: Any, run_dir: Path, *overrides: str) -> tuple[int, dict[str, Any]]:
    """run_predict on the config the CLI would compose; (failed count, predictions.json)."""
    words = str(inputs) if isinstance(inputs, (str, Path)) else "[" + ",".join(str(i) for i in inputs) + "]"
    config = compose_config([f"checkpoint={checkpoint}", f"inputs={words}", "command=predict", "trainer.threads=1",
                             *overrides])[0]
    failed = run_predict(config, run_dir)
    return failed, json.loads((run_dir / "predictions.json").read_text())


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(r["path"]).name: r for r in report["predictions"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("predict")
    train_run(root / "train", *TRAIN)
    checkpoint = root / "train" / "checkpoints" / "best.pt"
    blob = torch.load(checkpoint, weights_only=True)
    test = load_data(checkpoint_data_config(blob)).test
    pngs = root / "pngs"
    pngs.mkdir()
    for i, image in enumerate(test.x):  # CIFAR's layout (uint8 [3, 32, 32]) written as lossless PNG
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(pngs / f"{i:03d}.png")
    return {"root": root, "checkpoint": checkpoint, "test": test, "pngs": pngs, "classes": blob["data"]["classes"]}


@pytest.fixture(scope="module")
def exported(trained: dict[str, Any]) -> dict[str, Path]:
    """model.onnx from `mobilebench export` and model.int8.onnx from `mobilebench quantize method=static`."""
    root, checkpoint = trained["root"], trained["checkpoint"]
    for command, extra in (("export", ["format=onnx", *QUICK_EXPORT]), ("quantize", ["method=static", *QUICK_QUANTIZE])):
        result = run_cli(command, f"checkpoint={checkpoint}", *extra, f"hydra.run.dir={root / command}")
        assert result.returncode == 0, result.stderr
    return {"fp32": root / "export" / "model.onnx", "int8": root / "quantize" / "model.int8.onnx"}


# --- same answer as eval ---------------------------------------------------------------------


def test_checkpoint_predictions_equal_eval_on_png_files(trained: dict[str, Any], tmp_path: Path) -> None:
    expected, probs = eval_top1(trained["checkpoint"], trained["test"].x)
    failed, report = predict(trained["checkpoint"].parent.parent, trained["pngs"], tmp_path)  # a run dir works too
    assert failed == 0 and report["failed"] == 0 and report["predicted"] == len(expected) == 200
    assert report["backend"] == "pytorch" and report["model"] == "v1" and report["classes"] == trained["classes"]
    assert report["checkpoint"] == str(trained["checkpoint"])
    records = by_name(report)
    for i, (label, row) in enumerate(zip(expected, probs)):
        record = records[f"{i:03d}.png"]
        assert record["top1"] == trained["classes"][label], i
        assert record["top1_prob"] == pytest.approx(float(row[label]), abs=1e-6)
    # The model is a real classifier, so agreeing with it means something.
    assert sum(e == int(y) for e, y in zip(expected, trained["test"].y)) / len(expected) > 0.8


def test_onnx_fp32_and_int8_agree_with_the_checkpoint(trained: dict[str, Any], exported: dict[str, Path],
                                                      tmp_path: Path) -> None:
    expected, probs = eval_top1(trained["checkpoint"], trained["test"].x)
    want = [trained["classes"][i] for i in expected]
    meta = {}
    for kind, path in exported.items():
        meta[kind] = {p.key: p.value for p in onnx.load(str(path)).metadata_props if p.key.startswith("mobilebench.")}
        failed, report = predict(path, trained["pngs"], tmp_path / kind)
        assert failed == 0 and report["backend"] == "onnxruntime" and report["model"] == "v1"
        assert report["classes"] == trained["classes"] and report["preprocess"]["image_size"] == 32
        records = by_name(report)
        got = [records[f"{i:03d}.png"]["top1"] for i in range(len(want))]
        agreement = sum(g == w for g, w in zip(got, want)) / len(want)
        if kind == "fp32":
            assert agreement == 1.0
            assert max(abs(records[f"{i:03d}.png"]["top1_prob"] - float(probs[i, expected[i]])) for i in range(len(want))) < 1e-4
        else:
            assert agreement >= 0.99, agreement
    assert meta["int8"] == meta["fp32"]  # the int8 model carries its fp32 source's metadata
    assert json.loads(meta["fp32"]["mobilebench.classes"]) == trained["classes"]
    assert meta["fp32"]["mobilebench.model"] == "v1" and json.loads(meta["fp32"]["mobilebench.resize"]) is None


def test_resize_travels_from_checkpoint_and_onnx_metadata(trained: dict[str, Any], tmp_path: Path) -> None:
    """A model trained with augment.resize: eval upsamples the normalised batch, and so must predict."""
    from mobilebench.deploy.export import run_export
    from mobilebench.deploy.onnx import read_file_metadata

    blob = torch.load(trained["checkpoint"], weights_only=True)
    blob["config"]["augment"]["resize"] = 48
    resized = tmp_path / "resized.pt"
    save_checkpoint(blob, resized)
    x = trained["test"].x[:40]
    expected, probs = eval_top1(resized, x, resize=48)
    _, plain_probs = eval_top1(trained["checkpoint"], x)
    assert not torch.allclose(probs, plain_probs, atol=1e-3)  # the resize really changes the outputs
    inputs = [trained["pngs"] / f"{i:03d}.png" for i in range(len(x))]
    _, report = predict(resized, inputs, tmp_path / "pt")
    assert report["preprocess"]["resize"] == 48
    got = [r["top1_prob"] for r in report["predictions"]]
    assert got == pytest.approx([float(p[e]) for p, e in zip(probs, expected)], abs=1e-6)
    export_config = compose_config([f"checkpoint={resized}", "trainer.threads=1", *QUICK_EXPORT])[0]
    model = Path(run_export(export_config, tmp_path / "export")["file"])
    assert json.loads(read_file_metadata(model)["mobilebench.resize"]) == 48
    _, onnx_report = predict(model, inputs, tmp_path / "onnx")
    assert onnx_report["preprocess"]["resize"] == 48
    assert [r["top1_prob"] for r in onnx_report["predictions"]] == pytest.approx(got, abs=1e-4)


# --- any image, and unreadable ones -------------------------------------------------------------


def test_mixed_folder_predicts_every_image_and_names_the_corrupt_one(trained: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "nested" / "deeper").mkdir(parents=True)
    rgb = Image.fromarray(trained["test"].x[0].permute(1, 2, 0).numpy())
    rgb.convert("RGBA").resize((40, 40)).save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.resize((640, 360)).save(folder / "nested" / "big.JPG", quality=90)
    rgb.save(folder / "nested" / "deeper" / "deep.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "notes.txt").write_text("not an image, and skipped by its name")
    extra = tmp_path / "photo.data"  # a listed file is tried whatever its name
    rgb.save(extra, format="PNG")
    run_dir = tmp_path / "run"
    result = run_cli("predict", f"checkpoint={trained['checkpoint']}", f"inputs=[{folder},{extra}]",
                     "predict.top_k=3", "predict.table_rows=2", "trainer.threads=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "corrupt.png" in err[0] and "Traceback" not in result.stderr, result.stderr
    assert "4 more image(s) not shown" in result.stdout
    report = json.loads((run_dir / "predictions.json").read_text())
    names = sorted(Path(r["path"]).name for r in report["predictions"])
    assert names == sorted(["rgba.png", "palette.png", "gray.png", "big.JPG", "deep.png", "photo.data"])
    assert report["predicted"] == 6 and report["failed"] == 1 and report["images"] == 7
    assert Path(report["failures"][0]["path"]).name == "corrupt.png" and "cannot read image" in report["failures"][0]["error"]
    rows = list(csv.DictReader((run_dir / "predictions.csv").open()))
    assert [r["path"] for r in rows] == [r["path"] for r in report["predictions"]]
    assert list(rows[0]) == ["path", "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
    # Each odd image is decoded as the training data would be, then scored as eval scores it.
    records = by_name(report)
    for name in ("big.JPG", "gray.png", "rgba.png"):
        path = next(folder.rglob(name))
        label, probs = eval_top1(trained["checkpoint"], decode_image(str(path), 32)[None])
        assert records[name]["top1"] == trained["classes"][label[0]]
        assert records[name]["top1_prob"] == pytest.approx(float(probs[0, label[0]]), abs=1e-6)


def test_top_k_is_capped_sorted_and_sums_to_at_most_one(trained: dict[str, Any], tmp_path: Path) -> None:
    inputs = [trained["pngs"] / f"{i:03d}.png" for i in range(5)]
    for top_k, want in ((50, 10), (3, 3)):
        _, report = predict(trained["checkpoint"], inputs, tmp_path / str(top_k), f"predict.top_k={top_k}")
        assert report["top_k"] == want
        for record in report["predictions"]:
            probs = [t["prob"] for t in record["topk"]]
            assert len(probs) == want and len({t["class"] for t in record["topk"]}) == want
            assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
            assert record["topk"][0] == {"class": record["top1"], "prob": record["top1_prob"]}
            if want == 10:
                assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        header = next(csv.reader((tmp_path / str(top_k) / "predictions.csv").open()))
        assert header[-1] == f"top{want}_prob" and len(header) == 1 + 2 * want


# --- one-line mistakes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(trained: dict[str, Any], exported: dict[str, Path]) -> dict[str, Path]:
    root = trained["root"] / "bad"
    root.mkdir()
    model = onnx.load(str(exported["fp32"]))
    del model.metadata_props[:]
    onnx.save(model, str(root / "bare.onnx"))
    shutil.copy(trained["checkpoint"], root / "checkpoint.onnx")  # a .pt renamed
    shutil.copy(exported["fp32"], root / "model.pt")  # an ONNX renamed
    shutil.copy(trained["checkpoint"], root / "model.pt2")
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("model, inputs, message", [
    ("checkpoint", "missing.png", "missing.png does not exist"),
    ("bare.onnx", "000.png", "has no mobilebench metadata (class names, preprocessing)"),
    ("model.pt2", "000.png", "is a torch.export program; predict takes a training checkpoint"),
    ("checkpoint.onnx", "000.png", "is a PyTorch file (a zip archive), not an ONNX model"),
    ("model.pt", "000.png", "is an ONNX model, not a training checkpoint; rename it to model.onnx"),
])
def test_mistakes_are_one_line_and_exit_2(trained: dict[str, Any], bad_models: dict[str, Path], tmp_path: Path,
                                          model: str, inputs: str, message: str) -> None:
    checkpoint = trained["checkpoint"] if model == "checkpoint" else bad_models[model]
    result = run_cli("predict", f"checkpoint={checkpoint}", f"inputs={trained['pngs'] / inputs}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(err) == 1 and err[0].startswith("mobilebench: error: ") and message in err[0], err
    assert not (tmp_path / "run" / "predictions.json").exists()


def test_other_mistakes_are_user_errors(trained: dict[str, Any], exported: dict[str, Path], tmp_path: Path) -> None:
    from mobilebench.deploy.onnx import write_metadata

    wrong = tmp_path / "wrong_size.onnx"  # a 32 px graph whose metadata claims 48 px inputs
    shutil.copy(exported["fp32"], wrong)
    write_metadata(wrong, {"mobilebench.resize": "48"})
    with pytest.raises(UserError, match=r"takes input of shape .* but its metadata says 3 x 48 x 48"):
        predict(wrong, trained["pngs"] / "000.png", tmp_path / "w")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"holds no images"):
        predict(trained["checkpoint"], empty, tmp_path / "a")
    config = compose_config([f"checkpoint={trained['checkpoint']}", "command=predict"])[0]
    with pytest.raises(UserError, match=r"predict needs inputs="):
        run_predict(config, tmp_path / "b")
    with pytest.raises(UserError, match=r"needs a checkpoint: mobilebench predict"):
        run_predict(compose_config(["command=predict", f"inputs={trained['pngs']}"])[0], tmp_path / "c")
