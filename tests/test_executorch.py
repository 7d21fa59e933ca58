"""ExecuTorch: `export format=executorch` (XNNPACK, fully delegated, parity in executorch.runtime),
`export.int8=true` (PT2E int8 whose every conv runs in int8), `predict` on a `.pte` (class names and
preprocessing read from the program), and one-line errors (extra missing, truncated or foreign
`.pte`); `bench latency` with the ExecuTorch backends is in test_executorch_models.py.

Everything runs in the real runtime. Lowering is the slow part (tens of seconds per program on 2
cores), so each program is built once per module: v3_small fp32 + int8 in one export here; a
channel-pruned v2 and v1 inside the latency run are in test_executorch_models.py, so that a second
test worker can build them meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install 'mobilebench[mobile]')")

from mobilebench.deploy import executorch as et  # noqa: E402
from mobilebench.deploy.export import run_export  # noqa: E402
from mobilebench.errors import UserError  # noqa: E402
from mobilebench.models import build_model  # noqa: E402
from mobilebench.predict import run_predict  # noqa: E402

from .conftest import compose_config, run_cli  # noqa: E402
from .test_deploy import DATA  # noqa: E402
from .test_deploy import make_checkpoint as deploy_checkpoint  # noqa: E402

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MISSING = "executorch is not installed; install it with: pip install 'mobilebench[mobile]'"


def make_checkpoint(path: Path, name: str, width: float = 0.25) -> Path:
    """test_deploy's checkpoint, with class names so predict can be checked to read them."""
    return deploy_checkpoint(path, name, width=width, classes=CLASSES)


def config(*overrides: str) -> Any:
    return compose_config(["trainer.threads=1", *overrides])[0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def v3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v3_small exported as fp32 and int8 programs; parity batches of 40 exceed the program's bound of 32."""
    root = tmp_path_factory.mktemp("v3")
    ckpt = make_checkpoint(root / "v3_small.pt", "v3_small")
    report = run_export(config(f"checkpoint={ckpt}", "export.format=executorch", "export.int8=true",
                               "export.parity_images=48", "export.batch_size=40", "quantize.calib_size=32",
                               "quantize.test_images=48"), root / "export")
    return {"ckpt": ckpt, "report": report, "dir": root / "export"}


def test_v3_small_exports_fully_delegated_and_matches_pytorch(v3: dict[str, Any]) -> None:
    report, out = v3["report"], v3["dir"]
    p = report["parity"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["agreement"] >= 0.999 and p["images"] == 48
    d = report["delegation"]
    assert d["non_delegated_nodes"] == 0 and d["non_delegated_ops"] == {} and d["delegates"] == 1
    assert d["delegated_nodes"] > 100 and d["backends"] == ["XnnpackBackend"]
    assert report["batch"] == {**report["batch"], "dynamic": True, "min": 1, "max": et.MAX_BATCH}
    saved = json.loads((out / "export.json").read_text())
    assert saved["format"] == "executorch" and saved["bytes"] == (out / "model.pte").stat().st_size
    assert saved["executorch_threads"] == 1 and saved["metadata"]["method"] == et.METADATA_METHOD
    # any batch size: 1, the bound, and past it (run in pieces)
    model = torch.load(v3["ckpt"], weights_only=True)
    net = build_model(**model["model_args"]).eval()
    net.load_state_dict(model["model"])
    run = et.pte_runner(out / "model.pte", threads=1)
    for n in (1, 32, 35):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            assert abs(run(x) - net(x).numpy()).max() < 1e-4


def test_int8_program_runs_every_conv_in_int8(v3: dict[str, Any]) -> None:
    q = v3["report"]["int8"]
    assert q["convs"]["conv"]["float"] == 0 and q["convs"]["conv"]["int8"] == 52 and q["convs"]["int8_share"] == 1.0
    assert q["convs"]["linear"]["int8"] == 2 and "inside an XNNPACK delegate" in q["convs"]["counted"]
    assert q["delegation"]["non_delegated_nodes"] == 0 and q["calib_images"] == 32
    assert q["parity"]["passed"] and q["parity"]["agreement"] >= 0.99 and "atol" not in q["parity"]
    assert q["bytes"] * 2 < v3["report"]["bytes"]  # int8 weights are a quarter of fp32's; the rest is program overhead
    assert set(q["accuracy"]) == {"images", "pytorch", "fp32", "int8"} and q["accuracy"]["images"] == 48
    assert q["accuracy"]["fp32"] == q["accuracy"]["pytorch"]


def test_conv_share_of_a_converted_graph_before_lowering() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    program, seen = et.quantize_program(model, 8, [torch.randn(4, 3, 8, 8)])
    share = et.int8_conv_share(program)
    assert seen == 4 and share["conv"] == {"int8": 2, "float": 0} and "before lowering" in share["counted"]
    plain = et.int8_conv_share(et.export_program(model, 8))
    assert plain["conv"] == {"int8": 0, "float": 2} and plain["int8_share"] == 0.0


def test_runner_takes_any_batch_of_a_fixed_batch_program(tmp_path: Path) -> None:
    """A .pte exported elsewhere with a fixed batch: short pieces are zero-padded, long batches cut."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1)).eval()
    report = et.lower_to_pte(torch.export.export(model, (torch.randn(4, 3, 8, 8),)), tmp_path / "fixed.pte", None)
    assert report["max_batch"] is None and report["non_delegated_nodes"] == 0
    assert et.read_pte_metadata(tmp_path / "fixed.pte") is None  # no metadata method: predict refuses it
    run = et.pte_runner(tmp_path / "fixed.pte")
    for n in (1, 4, 9):
        x = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            assert abs(run(x) - model(x).numpy()).max() < 1e-5


# --- predict -------------------------------------------------------------------------------------


def predict(checkpoint: Path, images: Path, run_dir: Path) -> dict[str, Any]:
    run_predict(compose_config([f"checkpoint={checkpoint}", f"inputs={images}", "command=predict",
                                "trainer.threads=1", "trainer.channels_last=false"])[0], run_dir)
    return json.loads((run_dir / "predictions.json").read_text())


def test_predict_on_a_pte_matches_its_checkpoint_and_reads_its_classes(v3: dict[str, Any], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(3)
    for i in range(6):  # odd sizes and modes: predict decodes them as training did
        pixels = (torch.rand(40 + i, 36, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).convert("RGBA" if i % 2 else "RGB").save(images / f"{i}.png")
    reference = predict(v3["ckpt"], images, tmp_path / "pt")
    fp32 = predict(v3["dir"] / "model.pte", images, tmp_path / "pte")
    int8 = predict(v3["dir"] / "model_int8.pte", images, tmp_path / "pte8")
    assert fp32["backend"] == int8["backend"] == "executorch" and fp32["classes"] == int8["classes"] == CLASSES
    top1 = [r["top1"] for r in reference["predictions"]]
    assert [r["top1"] for r in fp32["predictions"]] == top1
    for got, want in zip(fp32["predictions"], reference["predictions"]):
        assert got["top1_prob"] == pytest.approx(want["top1_prob"], abs=1e-4)
    assert sum(a["top1"] == b for a, b in zip(int8["predictions"], top1)) >= 5
    for name in ("model.pte", "model_int8.pte"):
        meta = et.read_pte_metadata(v3["dir"] / name)
        assert meta == {"model": "v3_small", "classes": CLASSES, "mean": DATA["mean"], "std": DATA["std"],
                        "image_size": 32, "resize": None}


# --- errors --------------------------------------------------------------------------------------


def test_bad_pte_files_are_one_line(v3: dict[str, Any], tmp_path: Path) -> None:
    good = (v3["dir"] / "model.pte").read_bytes()
    (tmp_path / "truncated.pte").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.pte").write_text("not a program at all, just some text that is long enough\n" * 4)
    (tmp_path / "ckpt.pte").write_bytes(v3["ckpt"].read_bytes())
    (tmp_path / "program.pt").write_bytes(good)
    for name in ("truncated.pte", "text.pte"):
        with pytest.raises(UserError, match="is not a readable ExecuTorch program"):
            et.read_pte_metadata(tmp_path / name)
        with pytest.raises(UserError, match="is not a readable ExecuTorch program"):
            et.pte_runner(tmp_path / name)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(UserError, match="is a PyTorch file"):
        predict(tmp_path / "ckpt.pte", image, tmp_path / "p1")
    with pytest.raises(UserError, match="is an ExecuTorch program, not a training checkpoint; rename it to program.pte"):
        predict(tmp_path / "program.pt", image, tmp_path / "p2")
    result = run_cli("predict", f"checkpoint={tmp_path / 'truncated.pte'}", f"inputs={image}", f"hydra.run.dir={tmp_path}/run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("mobilebench: error: ") and "truncated" in lines[0] and "File size is too small" in lines[0]


@pytest.fixture(scope="module")
def no_executorch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PYTHONPATH with an `executorch` package that fails to import, as on an install without the extra."""
    root = tmp_path_factory.mktemp("fake")
    (root / "executorch").mkdir()
    (root / "executorch" / "__init__.py").write_text("raise ImportError('executorch is not here')\n")
    return {"PYTHONPATH": str(root)}


@pytest.mark.parametrize("args", [
    ["export", "format=executorch"],
    ["export", "format=executorch", "export.int8=true"],
    ["predict", "checkpoint=PTE", "inputs=PTE"],
    ["bench", "latency", "bench.backends=[pytorch,executorch_int8]"],
])
def test_missing_extra_is_one_line(v3: dict[str, Any], no_executorch: dict[str, str], tmp_path: Path, args: list[str]) -> None:
    args = [a.replace("PTE", str(v3["dir"] / "model.pte")) for a in args]
    if "checkpoint=" not in " ".join(args):
        args.append(f"checkpoint={v3['ckpt']}")
    result = run_cli(*args, f"hydra.run.dir={tmp_path}/run", env=no_executorch)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"mobilebench: error: {MISSING}"], result.stderr


def test_default_backends_leave_out_a_missing_runtime(no_executorch: dict[str, str]) -> None:
    code = ("from mobilebench.config import LatencyConfig; from mobilebench.deploy.latency import resolve_backends; "
            "print(resolve_backends(LatencyConfig()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **no_executorch})
    assert out.returncode == 0, out.stderr
    assert "executorch" not in out.stdout and "pytorch" in out.stdout
