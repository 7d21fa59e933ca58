"""Deployment: ONNX / torch.export parity, int8 quantization that reaches the convolutions, channel
and unstructured pruning, the latency benchmark, and one-line errors.

Checkpoints are built in-process (a width-0.25 model saved in the training format, synthetic data)
so no test trains; the fast TorchScript-based ONNX exporter is used except where the default
(dynamo) exporter itself is under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mobilebench.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint  # noqa: E402
from mobilebench.cli import main  # noqa: E402
from mobilebench.config import Config, QuantizeConfig  # noqa: E402
from mobilebench.deploy.common import load_source  # noqa: E402
from mobilebench.deploy.export import run_export  # noqa: E402
from mobilebench.deploy.int8 import conv_report, node_groups, quantize_static, runtime_ops  # noqa: E402
from mobilebench.deploy.latency import run_latency  # noqa: E402
from mobilebench.deploy.onnx import export_onnx  # noqa: E402
from mobilebench.deploy.prune import channel_prune, run_prune  # noqa: E402
from mobilebench.deploy.quantize import run_quantize  # noqa: E402
from mobilebench.errors import UserError  # noqa: E402
from mobilebench.models import MODEL_NAMES as MODELS  # noqa: E402
from mobilebench.models import build_model  # noqa: E402
from mobilebench.profile import count_macs, count_params  # noqa: E402

from .conftest import compose_config  # noqa: E402

DATA = {"name": "synthetic", "root": "unused", "download": False, "val_size": 16, "train_subset": 96, "test_subset": 64,
        "image_size": 32, "batch_size": 32, "num_classes": 10, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
FAST = {"exporter": "torchscript"}


def make_checkpoint(path: Path, name: str, seed: int = 0, width: float = 0.25,
                    classes: list[str] | None = None) -> Path:
    """A checkpoint in the training format with non-trivial BN statistics and well-separated logits."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, width_mult=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
        model.head.classifier.weight.normal_(0, 1.0)
    args = {"name": name, "num_classes": 10, "width_mult": width, "stem": "cifar", "dropout": None}
    payload = {"model_args": args, "model": model.state_dict(), "ema": None,
               "config": {"model": {"name": name}, "data": DATA, "augment": {"resize": None}},
               "data": {"classes": classes or [str(i) for i in range(10)], "mean": DATA["mean"], "std": DATA["std"],
                        "image_size": 32}}
    save_checkpoint(payload, path)
    return path


def _override(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def config(checkpoint: Path | None, **sections: dict) -> Config:
    """The config as the CLI composes and checks it, with `section.key=value` overrides."""
    overrides = [f"checkpoint={checkpoint}"] if checkpoint else []
    overrides += [f"{section}.{key}={_override(value)}" for section, values in sections.items()
                  for key, value in values.items()]
    return compose_config(overrides)[0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / f"{name}.pt", name) for name in MODELS}


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_pytorch(ckpts: dict[str, Path], tmp_path: Path, name: str) -> None:
    report = run_export(config(ckpts[name], export={**FAST, "parity_images": 64, "batch_size": 32}), tmp_path)
    p = report["parity"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["agreement"] >= 0.999 and p["images"] == 64
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    saved = json.loads((tmp_path / "export.json").read_text())
    assert saved["input"]["mean"] == DATA["mean"] and saved["input"]["std"] == DATA["std"]


@pytest.mark.slow
def test_default_dynamo_export_and_pt2(ckpts: dict[str, Path], tmp_path: Path) -> None:
    onnx_report = run_export(config(ckpts["v1"], export={"parity_images": 32, "batch_size": 16}), tmp_path / "onnx")
    assert onnx_report["exporter"] == "dynamo" and onnx_report["parity"]["passed"]
    pt2 = run_export(config(ckpts["v1"], export={"format": "pt2", "parity_images": 32, "batch_size": 16}), tmp_path / "pt2")
    assert pt2["parity"]["passed"] and (tmp_path / "pt2" / "model.pt2").is_file()


def test_export_fails_when_parity_fails(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="parity check failed"):
        run_export(config(ckpts["v1"], export={**FAST, "parity_images": 32, "atol": 1e-30}), tmp_path)
    assert not json.loads((tmp_path / "export.json").read_text())["parity"]["passed"]


# --- quantize ----------------------------------------------------------------------------------


def test_static_quantization_makes_convolutions_int8(ckpts: dict[str, Path], tmp_path: Path) -> None:
    source = load_source(str(ckpts["v2"]))
    fp32 = export_onnx(source.model, tmp_path / "model.onnx", 32, "torchscript")
    int8 = tmp_path / "model.int8.onnx"
    arrays = [torch.randn(16, 3, 32, 32).numpy() for _ in range(2)]
    quantize_static(fp32, int8, arrays, QuantizeConfig(), "v2")
    graph = onnx.load(str(int8)).graph
    int8_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # Every conv now reads its weight through DequantizeLinear from an int8 tensor, per channel.
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in int8_inits
        scale = next(i for i in graph.initializer if i.name == dq.input[1])
        assert scale.dims[0] == next(i for i in graph.initializer if i.name == dq.input[0]).dims[0]
    report = conv_report(graph)
    assert report["conv_int8"] == report["conv_total"] == len(convs) > 0
    assert runtime_ops(int8, 1).get("QLinearConv") == len(convs)  # what onnxruntime actually executes
    assert int8.stat().st_size < fp32.stat().st_size


def test_quantize_exclude_keeps_se_float(ckpts: dict[str, Path], tmp_path: Path) -> None:
    source = load_source(str(ckpts["v3_small"]))
    fp32 = export_onnx(source.model, tmp_path / "model.onnx", 32, "torchscript")
    graph = onnx.load(str(fp32)).graph
    ops = {n.name: n.op_type for n in graph.node}
    se_blocks = sum(1 for b in source.model.features if getattr(b, "se", None) is not None)
    se_ops = [ops[n] for n in node_groups(graph)["se"]]
    # Per SE block: pool, squeeze conv, ReLU, excite conv, HardSigmoid gate and the Mul it feeds.
    assert sorted(set(se_ops)) == ["Conv", "GlobalAveragePool", "HardSigmoid", "Mul", "Relu"]
    assert se_ops.count("Conv") == 2 * se_blocks and se_ops.count("Mul") == se_blocks
    int8 = tmp_path / "model.int8.onnx"
    quantize_static(fp32, int8, [torch.randn(8, 3, 32, 32).numpy()], QuantizeConfig(exclude=["se"]), "v3_small")
    kinds = conv_report(onnx.load(str(int8)).graph)["by_kind"]
    assert kinds["se"] == {"int8": 0, "float": 2 * se_blocks}
    assert kinds["pointwise"]["int8"] > 0 and kinds["pointwise"]["float"] == 0


def test_v3_rewrite_is_exact_and_leaves_no_float_islands(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from mobilebench.deploy.onnx import ort_run, ort_session
    from mobilebench.deploy.rewrite import rewrite_for_int8

    source = load_source(str(ckpts["v3_small"]))
    fp32 = export_onnx(source.model, tmp_path / "model.onnx", 32, "torchscript")
    model = onnx.load(str(fp32))
    counts = rewrite_for_int8(model)
    assert counts["hardswish"] > 0 and counts["se_gate"] == sum(1 for b in source.model.features if getattr(b, "se", None))
    assert not {"HardSwish", "HardSigmoid", "ReduceMean"} & {n.op_type for n in model.graph.node}
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    x = torch.randn(8, 3, 32, 32)
    ref, new = ort_run(ort_session(fp32, 1), x), ort_run(ort_session(tmp_path / "rewritten.onnx", 1), x)
    assert abs(ref - new).max() < 1e-4
    int8 = tmp_path / "model.int8.onnx"
    calib = [torch.randn(16, 3, 32, 32).numpy()]
    choice = quantize_static(fp32, int8, calib, QuantizeConfig(), "v3_small")
    # One x/6 rescale per h-swish folded into the scale of the int8 tensor it reads.
    assert choice["rewrites"] == {**counts, "folded_rescales": counts["hardswish"]}
    ops = runtime_ops(int8, 1)
    # Every activation stays int8: no float h-swish / gate / pooling between the int8 convolutions.
    assert not {"HardSwish", "HardSigmoid", "Mul", "ReduceMean", "GlobalAveragePool"} & set(ops)
    assert ops["QLinearConv"] == sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert ops["QLinearMul"] == counts["hardswish"] + counts["se_gate"]  # h-swish's x * gate and the SE gates


def test_folding_int8_rescales_is_exact(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from mobilebench.deploy.onnx import ort_run, ort_session
    from mobilebench.deploy.rewrite import fold_rescales, rewrite_for_int8

    source = load_source(str(ckpts["v3_small"]))
    model = onnx.load(str(export_onnx(source.model, tmp_path / "model.onnx", 32, "torchscript")))
    counts = rewrite_for_int8(model)
    onnx.save(model, str(tmp_path / "rewritten.onnx"))
    plain = tmp_path / "plain.int8.onnx"  # quantized as is: rewrite=false also skips the fold
    quantize_static(tmp_path / "rewritten.onnx", plain, [torch.randn(16, 3, 32, 32).numpy()],
                    QuantizeConfig(rewrite=False), "v3_small")
    int8 = onnx.load(str(plain))
    muls = sum(n.op_type == "Mul" for n in int8.graph.node)
    assert fold_rescales(int8) == counts["hardswish"]
    assert sum(n.op_type == "Mul" for n in int8.graph.node) == muls - counts["hardswish"]
    onnx.checker.check_model(int8)
    onnx.save(int8, str(tmp_path / "folded.int8.onnx"))
    x = torch.randn(32, 3, 32, 32)
    before, after = ort_run(ort_session(plain, 1), x), ort_run(ort_session(tmp_path / "folded.int8.onnx", 1), x)
    # The same integers under another scale: the folded graph skips a requantization that was an
    # identity (0.0 difference measured here); allow for an ulp of scale moving one rounding step.
    assert abs(before - after).max() <= 0.01 * abs(before).max()
    assert (before.argmax(1) == after.argmax(1)).mean() >= 0.95


def test_quantize_command_reports_accuracy_size_latency(ckpts: dict[str, Path], tmp_path: Path) -> None:
    q = {**FAST, "calib_size": 32, "repeats": 2, "warmup": 1, "latency_batches": [1, 8]}
    report = run_quantize(config(ckpts["v1"], quantize=q), tmp_path)
    assert set(report["accuracy"]) >= {"pytorch_fp32", "onnx_fp32", "onnx_int8", "drop_points"}
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"]
    assert set(report["latency"]) == {"1", "8"} and report["graph"]["conv_int8"] == report["graph"]["conv_total"]
    assert (tmp_path / "quantize.json").is_file() and (tmp_path / "model.int8.onnx").is_file()


def test_dynamic_quantization_reports_it_skips_convolutions(ckpts: dict[str, Path], tmp_path: Path) -> None:
    q = {"method": "dynamic", "repeats": 2, "warmup": 1, "latency_batches": [2]}
    report = run_quantize(config(ckpts["v3_small"], quantize=q), tmp_path)
    layers = report["layers"]
    assert layers["Conv2d"]["quantized"] == 0 and layers["Conv2d"]["total"] > 0
    assert layers["Linear"]["quantized"] == layers["Linear"]["total"] == 2
    assert "no Conv2d kernel" in report["note"]


# --- prune -------------------------------------------------------------------------------------


def _zero_dropped(model: torch.nn.Module, pruned: torch.nn.Module) -> None:
    """Silence, in the original, exactly the channels channel pruning removed (found by matching weights)."""
    from mobilebench.deploy.prune import inverted_residuals

    with torch.no_grad():
        for old, new in zip(inverted_residuals(model), inverted_residuals(pruned)):
            if old.expand is None:
                continue
            w_old = old.expand.conv.weight.flatten(1)
            kept = [int((w_old == w).all(1).nonzero()[0]) for w in new.expand.conv.weight.flatten(1)]
            dropped = sorted(set(range(old.hidden_channels)) - set(kept))
            old.project.conv.weight[:, dropped] = 0
            if old.se is not None:
                old.se.fc1.weight[:, dropped] = 0
                fc1_old = old.se.fc1.weight.flatten(1)[:, kept]
                sq_kept = [int((fc1_old == w).all(1).nonzero()[0]) for w in new.se.fc1.weight.flatten(1)]
                old.se.fc2.weight[:, sorted(set(range(old.se.squeeze_channels)) - set(sq_kept))] = 0


@pytest.mark.parametrize("name", ["v2", "v3_small"])
def test_channel_pruning_shrinks_model_and_keeps_function(ckpts: dict[str, Path], name: str) -> None:
    source = load_source(str(ckpts[name]))
    pruned, args = channel_prune(source.model, source.model_args, 0.5)
    assert count_params(pruned) < count_params(source.model)
    assert count_macs(pruned, 32) < count_macs(source.model, 32)
    widths, before = args["hidden_channels"], source.model.hidden_channels
    assert widths == pruned.hidden_channels and all(w <= b for w, b in zip(widths, before)) and widths != before
    assert all(w % 8 == 0 or w == b for w, b in zip(widths, before))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert pruned(x).shape == (4, 10)
        _zero_dropped(source.model, pruned)  # the original with the removed channels silenced...
        torch.testing.assert_close(pruned(x), source.model(x), atol=1e-4, rtol=1e-4)  # ...is the pruned model


def test_bn_reestimation_mixes_class_sorted_images() -> None:
    from mobilebench.data import Split
    from mobilebench.deploy.common import Source
    from mobilebench.deploy.prune import recalibrate_bn

    # Two classes, sorted as image folders are: dark images first, then bright ones.
    gen = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 40, (256, 3, 32, 32), dtype=torch.uint8, generator=gen)
    bright = torch.randint(215, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=gen)
    split = Split(torch.cat([dark, bright]), torch.cat([torch.zeros(256), torch.ones(256)]).long())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1, bias=False), torch.nn.BatchNorm2d(3))
    torch.nn.init.eye_(model[0].weight.view(3, 3))
    source = Source(model, "toy", {"num_classes": 2}, None, None, 32, [0.5] * 3, [0.25] * 3)
    recalibrate_bn(model, split, source, batch_size=64)
    x = (split.x.float() / 255 - 0.5) / 0.25
    overall = x.transpose(0, 1).reshape(3, -1).var(1)
    # Single-class batches would give the within-class variance, about 1/70 of the overall one
    # (the crop's zero padding moves the figures a little, not by that much).
    assert ((model[1].running_var / overall) > 0.5).all() and ((model[1].running_var / overall) < 2).all()
    assert (model[1].running_mean - x.mean((0, 2, 3))).abs().max() < 0.5


def test_pruned_checkpoint_works_everywhere(ckpts: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(ckpts["v3_small"], prune={"method": "channel", "amount": 0.3, "finetune_epochs": 1, "finetune_steps": 2})
    report = run_prune(cfg, {"prune": cfg.prune}, tmp_path / "prune")
    assert report["after"]["params"] < report["before"]["params"] and report["after"]["macs"] < report["before"]["macs"]
    assert len(report["finetune"]["history"]) == 1
    path = tmp_path / "prune" / "pruned.pt"
    model = load_model(path)
    assert model.hidden_channels == report["hidden_channels"]["after"]
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["model"]["hidden_channels"] == report["hidden_channels"]["after"]
    assert run_export(config(path, export={**FAST, "parity_images": 32}), tmp_path / "export")["parity"]["passed"]
    latency = run_latency(config(path, bench={"mode": "latency", "batch_sizes": [2], "repeats": 2, "warmup": 1,
                                              "backends": ["pytorch", "onnx_fp32"], **FAST}), tmp_path / "latency")
    assert set(latency["results"]) == {"pytorch", "onnx_fp32"}


def test_l1_unstructured_is_permanent(ckpts: dict[str, Path], tmp_path: Path) -> None:
    report = run_prune(config(ckpts["v2"], prune={"method": "l1_unstructured", "amount": 0.4}), {}, tmp_path)
    assert report["sparsity"]["conv_linear_weights"] == pytest.approx(0.4, abs=0.01)
    assert report["after"]["params"] == report["before"]["params"]  # same shapes: nothing got smaller
    # BN statistics are re-estimated on the pruned and, for a fair comparison, on the unpruned model.
    assert report["before"]["test_acc_bn_recalibrated"] is not None
    assert report["after"]["test_acc"] == report["after_pruning"]["test_acc_bn_recalibrated"]
    state = torch.load(tmp_path / "pruned.pt", weights_only=True)["model"]
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in state)
    assert load_model(tmp_path / "pruned.pt")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- latency -----------------------------------------------------------------------------------


def test_latency_of_random_model_writes_json(tmp_path: Path) -> None:
    cfg = config(None, bench={"mode": "latency", "batch_sizes": [1, 4], "repeats": 3, "warmup": 1, "threads": 1,
                              "calib_size": 8, "backends": ["pytorch", "onnx_fp32", "onnx_int8"], **FAST})
    cfg.model.name, cfg.model.width_mult = "v2", 0.25
    report = run_latency(cfg, tmp_path)
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert saved["threads"]["onnxruntime_intra_op"] == 1 and saved["checkpoint"] == "random weights"
    for backend in ("pytorch", "onnx_fp32", "onnx_int8"):
        for bs in ("1", "4"):
            row = report["results"][backend][bs]
            assert 0 < row["median_ms"] <= row["p90_ms"] and row["repeats"] == 3
    assert set(saved["speedup"]["int8_vs_fp32"]) == {"1", "4"}


# --- errors ------------------------------------------------------------------------------------


def test_unstructured_pruning_with_a_fine_tune_trains_the_pruned_v3_weights(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The fine-tune converts to the CPU fast paths; the pruned (hooked) SE and depthwise convs must keep
    their own forward, or their masked weights would never see a gradient."""
    report = run_prune(config(ckpts["v3_small"], prune={"method": "l1_unstructured", "amount": 0.3, "finetune_epochs": 1,
                                                        "finetune_steps": 2, "bn_calib_images": 0}), {}, tmp_path)
    before = torch.load(ckpts["v3_small"], weights_only=True)["model"]
    after = load_checkpoint(tmp_path / "pruned.pt")["model"]
    for key in ("features.4.se.fc1.weight", "features.4.depthwise.conv.weight", "features.4.expand.conv.weight"):
        kept = after[key] != 0
        assert kept.float().mean() < 0.99  # pruned: zeros remain
        assert not torch.allclose(after[key][kept], before[key][kept]), key  # and the kept weights trained
    assert report["sparsity"]["conv_linear_weights"] == pytest.approx(0.3, abs=0.01)


def test_errors_are_one_line(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs a checkpoint"):
        run_export(config(None), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_quantize(config(tmp_path / "missing.pt"), tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="refused|corrupt"):
        run_prune(config(bad), {}, tmp_path)
    with pytest.raises(UserError, match="inverted-residual"):
        run_prune(config(ckpts["v1"], prune={"method": "channel"}), {}, tmp_path)


@pytest.mark.parametrize("command, override, message", [
    ("export", "format=tflite", "export.format='tflite' is not valid; choose one of: onnx, pt2"),
    ("export", "export.frmat=onnx", "Could not override 'export.frmat'"),
    ("prune", "amount=1.5", "prune.amount=1.5 is out of range; it must be in (0, 1), e.g. 0.2"),
    ("quantize", "quantize.exclude=[everything]", "quantize.exclude has unknown group(s) everything; choose from: "
                                                  "stem, depthwise, se, hardswish, head"),
    ("bench", "bench.backends=[tflite]", "bench.backends has unknown backend(s) tflite"),
])
def test_bad_section_values_stop_before_any_work(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 command: str, override: str, message: str) -> None:
    """Every command section is typed in the schema: a mistake is one line and exit 2, and no run dir is made."""
    words = [command, "latency"] if command == "bench" else [command]
    with pytest.raises(SystemExit) as exit_info:
        main([*words, f"checkpoint={ckpts['v2']}", override, f"hydra.run.dir={tmp_path}/run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mobilebench: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_cli_prints_one_line_for_a_missing_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mobilebench", "export", f"checkpoint={tmp_path}/nope.pt", "format=onnx",
                             f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobilebench: error: checkpoint") and "does not exist" in lines[0]


def test_graph_edit_that_changes_the_logits_is_refused(tmp_path: Path) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from mobilebench.deploy.int8 import _save_if_same_logits

    # logits = x @ W, a one-node graph
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [w])
    reference = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(reference))
    arrays = [np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)]
    same = tmp_path / "same.onnx"
    _save_if_same_logits(onnx.load(str(reference)), reference, same, arrays, "a no-op edit changed the logits")
    assert same.exists()
    model = onnx.load(str(reference))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
    changed = tmp_path / "changed.onnx"
    with pytest.raises(UserError, match=r"doubling changed the logits by .*quantize.rewrite=false"):
        _save_if_same_logits(model, reference, changed, arrays, "doubling changed the logits")
    assert not changed.exists()
