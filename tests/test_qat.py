"""Quantization-aware training (`mobilebench quantize method=qat`): the PT2E QAT flow to an int8
ExecuTorch program, its freeze schedule, its report, and its one-line errors.

The end-to-end test trains a width-0.25 V1 on an easy synthetic set first (seconds), so that
agreement with the fp32 model means something; the freeze-schedule test uses random weights.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch", reason="the `mobile` extra (executorch) is not installed")

from mobilebench.checkpoint import save_checkpoint  # noqa: E402
from mobilebench.config import QuantizeConfig  # noqa: E402
from mobilebench.data import Split  # noqa: E402
from mobilebench.deploy import qat  # noqa: E402
from mobilebench.deploy.common import batches, load_source, source_data, take  # noqa: E402
from mobilebench.deploy.executorch import pte_runner, read_pte_metadata  # noqa: E402
from mobilebench.deploy.qat_ranges import activation_quantizers, calibrate_activation_ranges  # noqa: E402
from mobilebench.deploy.quantize import run_quantize  # noqa: E402
from mobilebench.errors import UserError  # noqa: E402
from mobilebench.models import build_model  # noqa: E402

from .conftest import compose_config, train_run  # noqa: E402

# An easy synthetic task a width-0.25 V1 learns in seconds (test accuracy ~1.0), so its int8 versions
# have clear margins to keep; label smoothing so the fine-tune must read it from the checkpoint.
TRAIN = ["model.name=v1", "data.train_subset=768", "data.test_subset=128", "trainer.epochs=6", "optimizer.lr=0.05",
         "trainer.label_smoothing=0.1", "trainer.cpu_kernels=off"]


def random_checkpoint(path: Path, name: str) -> Path:
    """A width-0.25 model in the training format, random weights (for the mechanics, not the accuracy)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width_mult=0.25).eval()
    args = {"name": name, "num_classes": 10, "width_mult": 0.25, "stem": "cifar", "dropout": None}
    _, plain = compose_config(["data=synthetic", "data.train_subset=256", "data.test_subset=64"])
    payload = {"model_args": args, "model": model.state_dict(), "ema": None, "config": plain,
               "data": {"classes": [f"class_{i}" for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}}
    save_checkpoint(payload, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    train_run(root / "v1", *TRAIN)
    return {"v1": root / "v1" / "checkpoints" / "best.pt", "v3_small": random_checkpoint(root / "v3_small.pt", "v3_small")}


def qat_config(checkpoint: Path | None, **quantize: object) -> object:
    overrides = [f"checkpoint={checkpoint}"] if checkpoint else []
    overrides += ["quantize.method=qat", *(f"quantize.{k}={'null' if v is None else v}" for k, v in quantize.items())]
    return compose_config(overrides)[0]


def test_qat_writes_a_runnable_int8_pte_that_agrees_with_fp32(ckpts: dict[str, Path], tmp_path: Path) -> None:
    config = qat_config(ckpts["v1"], qat_steps=3, qat_batch=32, calib_size=64, eval_batch=64)
    report = run_quantize(config, tmp_path)
    saved = json.loads((tmp_path / "quantize.json").read_text())
    assert saved["method"] == "qat" and saved["accuracy"] == report["accuracy"]
    assert set(saved["accuracy"]) >= {"pytorch_fp32", "pytorch_qat_int8", "executorch_qat_int8", "executorch_ptq_int8",
                                      "drop_points", "ptq_drop_points", "qat_gain_points"}
    assert set(saved["size_bytes"]) == {"fp32_state_dict", "ptq_int8", "qat_int8"}
    assert saved["size_bytes"]["qat_int8"] < saved["size_bytes"]["fp32_state_dict"] / 2  # int8 weights
    tune = saved["qat"]
    assert tune["steps"] == 3 and tune["label_smoothing"] == 0.1 and tune["seconds"] > 0 and tune["distill_from_fp32"] == 1.0
    assert tune["observers_frozen_at_step"] == 2 and tune["bn_frozen_at_step"] == 2  # round(0.5 * 3), round(0.75 * 3)
    assert tune["activation_ranges"] == "histogram" and tune["activation_quantizers_calibrated"] > 10
    # Fully delegated to XNNPACK, every conv int8; the QAT program is no bigger than the PTQ one (no dead BN tensors).
    for kind in ("qat", "ptq"):
        assert saved["delegation"][kind]["non_delegated_nodes"] == 0, saved["delegation"][kind]
        assert saved["delegation"][kind]["convs"]["int8_share"] == 1.0
    assert saved["size_bytes"]["qat_int8"] <= saved["size_bytes"]["ptq_int8"] * 1.01
    assert read_pte_metadata(tmp_path / "model_qat_int8.pte")["classes"] == [f"class_{i}" for i in range(10)]
    # The same int8 graph as ONNX QDQ: onnxruntime runs its convolutions as QLinearConv.
    assert saved["onnx_qdq"]["runtime_ops"]["QLinearConv"] == 27 and saved["accuracy"]["onnx_qat_int8"] >= 0.8

    # The .pte runs on its own in executorch.runtime, at any batch size, and mostly agrees with the fp32 model.
    source = load_source(str(ckpts["v1"]))
    test = take(source_data(source, config).test, None)
    run = pte_runner(tmp_path / "model_qat_int8.pte")
    agree = total = 0
    for x, _ in batches(test, source, 50):  # 50, 50, 28: batch sizes the export never saw
        with torch.no_grad():
            ref = source.model(x).argmax(1)
        out = torch.as_tensor(run(x))
        assert out.shape == (len(x), 10) and torch.isfinite(out).all()
        agree += int((out.argmax(1) == ref).sum())
        total += len(x)
    assert agree / total >= 0.8, agree / total  # a broken scale or BN fold lands near chance (0.1)
    assert abs(saved["accuracy"]["executorch_qat_int8"] - saved["accuracy"]["pytorch_qat_int8"]) <= 0.05


def test_observers_and_batchnorm_freeze_at_the_configured_steps(ckpts: dict[str, Path]) -> None:
    source = load_source(str(ckpts["v3_small"]))
    train = take(source_data(source, qat_config(ckpts["v3_small"])).train, 192)
    gm = qat.prepare_qat(source)
    # The QAT rewrite resets eps/momentum to torch's defaults; the model's own (V3: 1e-3, 0.01) are back.
    eps = {float(n.args[7]) for n in qat.bn_nodes(gm)}
    assert eps == {1e-3} and {float(n.args[6]) for n in qat.bn_nodes(gm)} == {0.01}
    quantizers = qat.fake_quantizers(gm)
    first_bn = qat.bn_nodes(gm)[0].args[3].target
    seen: list[tuple[int, bool, bool, list[torch.Tensor], torch.Tensor]] = []

    def scales() -> list[torch.Tensor]:
        return [q.scale.clone() for q in quantizers]

    def moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> int:
        return sum(not torch.equal(a, b) for a, b in zip(before, after))

    def record(step: int, graph: torch.fx.GraphModule) -> None:
        seen.append((step, qat.observers_frozen(graph), qat.bn_frozen(graph), scales(), graph.get_buffer(first_bn).clone()))

    cfg = QuantizeConfig(method="qat", qat_steps=4, qat_batch=32, qat_freeze_observers=0.5, qat_freeze_bn=0.75)
    tune = qat.finetune(gm, train, source, cfg, on_step=record)
    assert [s[:3] for s in seen] == [(0, False, False), (1, False, False), (2, True, False), (3, True, True)]
    assert tune["observers_frozen_at_step"] == 2 and tune["bn_frozen_at_step"] == 3 and tune["steps"] == 4
    # Frozen means frozen: the scales stop moving once observers are off, the running stats once BN is.
    assert moved(seen[1][3], seen[2][3]) > len(quantizers) / 2  # step 1 still observed
    assert moved(seen[2][3], seen[3][3]) == moved(seen[3][3], scales()) == 0
    assert not torch.equal(seen[2][4], seen[3][4]) and torch.equal(gm.get_buffer(first_bn), seen[3][4])
    assert all(int(q.fake_quant_enabled[0]) == 1 for q in quantizers)  # still fake-quantizing


def test_histogram_ranges_start_activations_where_ptq_would_and_hold_them(ckpts: dict[str, Path]) -> None:
    """qat_ranges=histogram: each activation range is fitted on the calibration images, convert reads that
    same range, and the fine-tune leaves it fixed while the weight quantizers still observe."""
    source = load_source(str(ckpts["v3_small"]))
    data = source_data(source, qat_config(ckpts["v3_small"]))
    calib = [x.numpy() for x, _ in batches(take(data.train, 64, seed=0), source, 32)]
    gm = qat.prepare_qat(source)
    acts = activation_quantizers(gm)
    weights = [q for q in qat.fake_quantizers(gm) if q not in acts]
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [q.register_forward_pre_hook(lambda m, a: inputs.setdefault(id(m), []).append(a[0].detach())) for q in acts]
    assert calibrate_activation_ranges(gm, source.model, calib) == len(acts) > 10
    for hook in hooks:
        hook.remove()
    from torchao.quantization.pt2e import MinMaxObserver

    for q in acts:
        scale, zero_point = q.calculate_qparams()  # what convert_pt2e will use
        assert torch.allclose(scale, q.scale, rtol=1e-6, atol=0) and torch.equal(zero_point.int(), q.zero_point.int())
        seen = torch.cat([t.flatten() for t in inputs[id(q)]])
        minmax = MinMaxObserver(dtype=q.dtype, qscheme=q.qscheme, quant_min=q.quant_min, quant_max=q.quant_max,
                                eps=float(q.activation_post_process.eps))
        minmax(seen)
        # Fitted to this activation: at most its min..max range (the histogram only trims tails), and
        # what it trims costs less than one quantization step on average.
        assert q.scale <= minmax.calculate_qparams()[0] * (1 + 1e-6)
        lo, hi = (q.quant_min - q.zero_point) * q.scale, (q.quant_max - q.zero_point) * q.scale
        assert float((seen - seen.clamp(float(lo), float(hi))).abs().mean()) < float(q.scale)
    # Back in train mode for the fine-tune, the model's BatchNorm literals in place.
    assert not qat.bn_frozen(gm) and {float(n.args[7]) for n in qat.bn_nodes(gm)} == {1e-3}
    before = [q.scale.clone() for q in acts], [q.scale.clone() for q in weights]
    cfg = QuantizeConfig(method="qat", qat_steps=2, qat_batch=32, qat_freeze_observers=1.0, qat_freeze_bn=1.0)
    qat.finetune(gm, take(data.train, 64), source, cfg)
    assert all(torch.equal(b, q.scale) for b, q in zip(before[0], acts))
    assert sum(not torch.equal(b, q.scale) for b, q in zip(before[1], weights)) > len(weights) / 2
    assert all(int(q.fake_quant_enabled[0]) == 1 for q in qat.fake_quantizers(gm))


def test_distilling_from_fp32_reads_no_label(ckpts: dict[str, Path]) -> None:
    """qat_distill=1: the fp32 model's logits are the whole target, so wrong labels change nothing;
    any label weight makes them count (a fine-tune that ignored the fp32 model would fail the first)."""
    source = load_source(str(ckpts["v1"]))
    train = take(source_data(source, qat_config(ckpts["v1"])).train, 96)
    wrong = Split(train.x, (train.y + 1) % 10)

    prepared = qat.prepare_qat(source)  # once: each fine-tune starts from a copy (preparing takes seconds)
    untrained = {k: v.clone() for k, v in prepared.state_dict().items()}

    def tuned(split: Split, alpha: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same dropout masks in every fine-tune
        gm = copy.deepcopy(prepared)
        qat.finetune(gm, split, source, QuantizeConfig(method="qat", qat_steps=2, qat_batch=32, qat_distill=alpha))
        return {k: v.clone() for k, v in gm.state_dict().items()}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    right = tuned(train, 1.0)
    assert same(right, tuned(wrong, 1.0))
    assert not same(right, untrained)  # it did train
    assert not same(tuned(train, 0.5), tuned(wrong, 0.5))


def test_schedule_rounds_fractions_and_lets_observers_see_one_step() -> None:
    plan = qat.schedule(QuantizeConfig(qat_epochs=2, qat_steps=5, qat_freeze_observers=0.0, qat_freeze_bn=1.0), 100)
    assert (plan.total, plan.observers_at, plan.bn_at) == (10, 1, 10)  # BN never freezes at 1.0
    assert qat.schedule(QuantizeConfig(qat_freeze_bn=0.0), 3).bn_at == 0  # frozen from the start


def test_qat_errors_are_one_line(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="needs a checkpoint"):
        run_quantize(qat_config(None), tmp_path)
    with pytest.raises(UserError, match=r"qat_freeze_bn=1.5 must be a fraction"):
        run_quantize(_with(qat_config(ckpts["v1"]), qat_freeze_bn=1.5), tmp_path)
    with pytest.raises(UserError, match=r"qat_distill=2.0 must be a weight in \[0, 1\]"):
        run_quantize(_with(qat_config(ckpts["v1"]), qat_distill=2.0), tmp_path)
    with pytest.raises(UserError, match=r"quantize.qat_ranges.*histogram, moving"):
        run_quantize(_with(qat_config(ckpts["v1"]), qat_ranges="ema"), tmp_path)
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"mobilebench\[mobile\]") as err:
        run_quantize(qat_config(ckpts["v1"]), tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "quantize.json").exists()


def _with(config: object, **quantize: object) -> object:
    for key, value in quantize.items():
        setattr(config.quantize, key, value)
    return config


class ConvBN(torch.nn.Module):
    """conv -> BatchNorm (MobileNetV3's eps 1e-3, running variances near it) -> ReLU -> conv."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
        self.head = torch.nn.Conv2d(8, 4, 1)
        var = torch.rand(8, generator=generator) * 2e-3 + 1e-4
        self.bn.running_var.copy_(var)
        with torch.no_grad():
            self.conv.weight.mul_(var.sqrt().view(-1, 1, 1, 1) / self.conv.weight.abs().amax())  # outputs O(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_the_int8_graph_computes_what_was_fake_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert_pt2e folds each conv-BN pair with eps=1e-5; V3's is 1e-3. The converted int8 graph must
    compute what the fake-quantized graph it came from computed (without the eps fix it is far off)."""
    from types import SimpleNamespace

    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = ConvBN()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    source = SimpleNamespace(model=model)

    def relative_error() -> float:
        graph = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
        gm = prepare_qat_pt2e(graph, qat.qat_quantizer())
        qat.restore_bn_literals(gm, qat.bn_literals(model))
        qat.freeze_bn_stats(gm)
        with torch.no_grad():
            gm(x)  # the observers see the batch, then hold still
            qat.freeze_observers(gm)
            move_exported_model_to_eval(gm)
            qat.restore_bn_literals(gm, qat.bn_literals(model))
            fake = gm(x)
            real = qat.convert_qat(gm, source)(x)  # type: ignore[arg-type]
        return float((real - fake).abs().max() / fake.abs().max())

    assert relative_error() < 0.05  # int8 rounding of one function (measured 0.015)
    monkeypatch.setattr(qat, "fold_with_model_eps", lambda gm, literals: [])
    assert relative_error() > 0.15  # folded with torchao's eps: another function (measured 0.29)
