"""The CPU fast paths (mobilebench/accel): same outputs and gradients as the plain model, same
state-dict keys, old checkpoints still load and resume, and each stand-in really runs its own path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

from mobilebench import accel
from mobilebench.accel import native
from mobilebench.accel.modules import DepthwiseConv2d, FusedSqueezeExcitation, InPlaceReLU6
from mobilebench.checkpoint import load_checkpoint, load_model
from mobilebench.models import MODEL_NAMES, SqueezeExcitation, build_model

from . import legacy
from .conftest import train_run

CPU = torch.device("cpu")


def expected_swaps(model: nn.Module) -> dict[str, int]:
    """What convert should swap in fp32 on the CPU, counted from the plain model's structure."""
    dw5 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size[0] >= 5]
    return {**dict.fromkeys(accel.PATHS, 0), "se": sum(type(m) is SqueezeExcitation for m in model.modules()),
            "relu6": sum(type(m) is nn.ReLU6 for m in model.modules()),
            "depthwise_native": len(dw5) if not native.unavailable_reason() else 0}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def assert_grads_close(fast: dict[str, torch.Tensor], plain: dict[str, torch.Tensor], rel: float) -> None:
    """Each gradient within `rel` of its own scale; one whose true value is zero (a BN bias whose
    shift the next BN removes) sits at rounding noise, so the floor is `rel` of 1% of the model's largest."""
    scale = max(float(g.abs().max()) for g in plain.values())
    for key, grad in plain.items():
        err = float((fast[key] - grad).abs().max())
        assert err <= rel * max(float(grad.abs().max()), 1e-2 * scale), (key, err, float(grad.abs().max()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_converted_model_matches_the_plain_one_in_training(name: str) -> None:
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10, width_mult=0.5).train().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    counts = accel.convert(fast, CPU, None)
    assert counts == expected_swaps(plain)
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    results = []
    for model in (fast, plain):
        torch.manual_seed(1)  # the same dropout mask
        out = model(x * 1.0)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_fast, grads_fast), (out_plain, grads_plain) = results
    assert (out_fast - out_plain).abs().max() <= 1e-6
    assert_grads_close(grads_fast, grads_plain, 1e-5)
    # The running statistics moved alike (the stand-ins share the plain modules' buffers).
    for (key, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_converted_modules_share_the_plain_tensors_and_eval_matches() -> None:
    torch.manual_seed(0)
    model = build_model("v3_small", width_mult=0.5).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model).eval()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    accel.convert(model, CPU, None)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert any(isinstance(m, FusedSqueezeExcitation) for m in model.modules())
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_checkpoint_saved_before_the_split_loads_with_the_same_logits(name: str, tmp_path: Path) -> None:
    """A checkpoint in the layout e2dd53f wrote (recorded in tests/data, weights from a seed) loads
    into today's plain model and gives the logits that code gave."""
    entry = legacy.fixture()["models"][name]
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in build_model(**entry["model_args"]).state_dict().items()]
    assert layout == entry["layout"]  # same keys, order, shapes and dtypes as the old blocks
    path = legacy.write_legacy_checkpoint(tmp_path / "old.pt", name)
    with torch.no_grad():
        logits = load_model(path)(legacy.legacy_input())
    torch.testing.assert_close(logits, torch.tensor(entry["logits"]), rtol=0, atol=1e-6)


def test_hooked_or_pruned_convs_are_left_alone() -> None:
    model = build_model("v3_small", width_mult=0.5)
    dw5 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size[0] == 5]
    seen = []
    dw5[0].register_forward_hook(lambda *_: seen.append(1))
    torch.nn.utils.prune.l1_unstructured(dw5[1], "weight", amount=0.5)
    counts = accel.convert(model, CPU, None)
    swapped = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    assert counts["depthwise_native"] == len(swapped) == len(dw5) - 2
    kept = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert any(m is dw5[0] for m in kept) and any(m is dw5[1] for m in kept)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == [1] and dw5[1].weight_orig.grad is not None


def test_a_hooked_or_pruned_squeeze_excitation_is_left_alone_and_still_learns() -> None:
    model = build_model("v3_small", width_mult=0.5).train()
    se = [m for m in model.modules() if type(m) is SqueezeExcitation]
    seen = []
    se[0].fc1.register_forward_hook(lambda *_: seen.append(1))
    torch.nn.utils.prune.l1_unstructured(se[1].fc2, "weight", amount=0.5)
    assert accel.convert(model, CPU, None)["se"] == len(se) - 2
    before = se[1].fc2.weight_orig.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert seen == [1] and not torch.equal(se[1].fc2.weight_orig, before)  # the hook ran; the pruned weight trains


def test_the_native_gradient_needs_channels_last() -> None:
    nchw = accel.convert(build_model("v3_small", width_mult=0.5), CPU, None, channels_last=False)
    assert nchw["depthwise_native"] == 0 and nchw["se"] > 0


def test_under_cpu_bf16_autocast_the_slow_depthwise_convs_run_in_fp32() -> None:
    model = build_model("v3_small", width_mult=0.5).train().to(memory_format=torch.channels_last)
    counts = accel.convert(model, CPU, torch.bfloat16)
    assert counts["se"] == 0  # SE's one-pass backward is fp32 only
    assert accel.convert(build_model("v2", width_mult=0.5), CPU, torch.bfloat16)["relu6"] == 0  # so is relu6's
    kept = [m for m in model.modules() if isinstance(m, DepthwiseConv2d) and m.fp32_autocast]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # Depthwise convs other than 3x3 stride 1: the strided ones and V3's 5x5 ones.
    assert kept == [m for m in depthwise if m.kernel_size[0] != 3 or m.stride[0] != 1] and counts["depthwise_fp32"] == len(kept)
    dtypes: dict[nn.Module, torch.dtype] = {}
    for conv in depthwise:
        conv.register_forward_hook(lambda mod, args, out: dtypes.__setitem__(mod, out.dtype))
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), torch.tensor([1, 2, 3, 4])).backward()
    assert {m for m in depthwise if dtypes[m] == torch.float32} == set(kept)
    assert all(dtypes[m] == torch.bfloat16 for m in depthwise if m not in kept)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # Validation (eval mode) runs them as the plain model does, like the final test's plain model.
    dtypes.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(x)
    assert all(dtypes[m] == torch.bfloat16 for m in depthwise)


def test_cpu_kernels_setting() -> None:
    gpu = torch.device("cuda")
    assert accel.enabled("auto", CPU, compiled=False) and not accel.enabled("auto", gpu, compiled=False)
    assert accel.enabled("on", gpu, compiled=False) and not accel.enabled("off", CPU, compiled=False)
    # A compiled model takes the stock modules whatever the setting: the stand-ins are eager code.
    assert not any(accel.enabled(s, CPU, compiled=True) for s in ("auto", "on", "off"))
    with pytest.raises(ValueError, match="auto, on, off"):
        accel.enabled("fast", CPU, compiled=False)


def test_train_applies_the_fast_paths_only_when_asked(tmp_path: Path) -> None:
    train_run(tmp_path / "on", "model=v3_small")
    train_run(tmp_path / "off", "model=v3_small", "trainer.cpu_kernels=off")
    on, off = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("on", "off"))
    assert on["cpu_kernels"]["swapped"] == expected_swaps(build_model("v3_small", width_mult=0.25))
    assert on["cpu_kernels"]["setting"] == "auto" and off["cpu_kernels"]["swapped"] == {}
    # The same run either way, up to float rounding: the paths change speed, not what is learned.
    assert on["test_acc"] == pytest.approx(off["test_acc"], abs=2 / 64)
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("on", "off"))
    assert list(a) == list(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-6, msg=key)


# --- the stand-ins' own paths --------------------------------------------------------------


def onednn_weight_grad(grad: torch.Tensor, x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    weight = torch.zeros(x.shape[1], 1, k, k)
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0],
                                               x.shape[1], [False, True, False])[1]


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The argument tuples of every native.depthwise_weight_grad call made during the test."""
    calls: list[tuple] = []
    kernel = native.depthwise_weight_grad
    monkeypatch.setattr(native, "depthwise_weight_grad", lambda *a: calls.append(a) or kernel(*a))
    return calls


def test_the_kernel_builds_where_a_c_compiler_is_found() -> None:
    if native._compiler() is None:
        assert "no C compiler" in native.unavailable_reason()
    else:
        assert native.unavailable_reason() == "" and accel.native_state() == "on"


@pytest.mark.parametrize("n, c, size, k, s", [
    (3, 16, 7, 5, 1),   # odd size: every border case of the 5x5 window
    (4, 24, 9, 5, 2),   # strided, output 5x5
    (2, 8, 2, 5, 2),    # the window is larger than the image
    (5, 40, 6, 7, 1),   # another kernel size
    (3, 12, 8, 3, 2),
])
def test_native_weight_grad_matches_onednn(n: int, c: int, size: int, k: int, s: int) -> None:
    torch.manual_seed(0)
    p = (k - 1) // 2
    x = torch.randn(n, c, size, size).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, torch.randn(c, 1, k, k), None, s, p, 1, c)
    grad = torch.randn_like(out)
    assert native.supports(x) and native.supports(grad)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # one part, and images split over two
            torch.set_num_threads(threads)
            got = native.depthwise_weight_grad(grad, x, k, s, p)
            torch.testing.assert_close(got, onednn_weight_grad(grad, x, k, s, p), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    assert not native.supports(x.contiguous()) and not native.supports(x.double())


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_stand_in_takes_the_native_gradient_and_matches_the_stock_conv(stride: int, kernel_calls: list[tuple]) -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(24, 24, 5, stride, 2, groups=24, bias=False).to(memory_format=torch.channels_last)
    fast = DepthwiseConv2d.from_plain(copy.deepcopy(plain), native_grad=True, fp32_autocast=False)
    x = torch.randn(4, 24, 9, 9).contiguous(memory_format=torch.channels_last)

    def run(conv: nn.Module, memory_format: torch.memory_format = torch.channels_last) -> list[torch.Tensor]:
        leaf = x.clone(memory_format=memory_format).requires_grad_()
        out = conv(leaf * 1.5)  # a non-leaf input, as after an activation
        weights = torch.linspace(-1, 1, out.numel()).view_as(out).contiguous(memory_format=memory_format)
        (out * weights).sum().backward()  # the output gradient in the input's layout, as from a BN
        return [out.detach(), leaf.grad, conv.weight.grad]

    ours, ref = run(fast), run(plain)
    assert len(kernel_calls) == 1  # the native kernel ran once, for the one conv
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    run(fast, torch.contiguous_format)  # a layout the kernel cannot read: oneDNN's gradient, same module
    assert len(kernel_calls) == 1


def test_the_build_is_cached_and_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cc = native._compiler()
    if cc is None:
        pytest.fail("no C compiler to test the build with; this machine's image ships gcc")
    monkeypatch.setenv("MOBILEBENCH_CACHE", str(tmp_path))
    native._load(cc)
    built = sorted((tmp_path / "native").glob("*"))
    assert [p.suffix for p in built] == [".so", ".sha256"]  # the library and its recorded digest
    mtimes = [p.stat().st_mtime_ns for p in built]
    native._load(cc)  # the second load reuses the library
    assert sorted((tmp_path / "native").glob("*")) == built and [p.stat().st_mtime_ns for p in built] == mtimes

    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native._library.cache_clear()
    try:
        assert native.unavailable_reason() == f"disabled by {native.DISABLE_ENV}"
        assert accel.native_state() == f"off: disabled by {native.DISABLE_ENV}"
        assert not native.supports(torch.zeros(1, 1, 1, 1))
        # Without the library the 5x5 convs keep oneDNN: convert does not swap them.
        assert accel.convert(build_model("v3_small", width_mult=0.25), CPU, None)["depthwise_native"] == 0
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_fused_squeeze_excitation_matches_the_plain_block(memory_format: torch.memory_format) -> None:
    torch.manual_seed(0)
    plain = SqueezeExcitation(24, 8).train()
    with torch.no_grad():
        plain.fc2.bias.fill_(1.0)  # keep most gate inputs inside (-3, 3), where hard-sigmoid has a slope
    fast = FusedSqueezeExcitation.from_plain(copy.deepcopy(plain))
    x = torch.randn(4, 24, 5, 6).contiguous(memory_format=memory_format)
    grad_out = torch.randn(4, 24, 5, 6)

    def run(se: nn.Module) -> tuple[str, list[torch.Tensor]]:
        leaf = x.clone().requires_grad_()
        out = se(leaf * 1.5)  # a non-leaf input, as after a BN
        (out * grad_out).sum().backward()
        return type(out.grad_fn).__name__, [out.detach(), leaf.grad, *(p.grad for p in se.parameters())]

    (node, ours), (ref_node, ref) = run(fast), run(plain)
    assert node == "_SqueezeExciteBackward" and ref_node != node  # the one-pass backward ran
    assert ours[0].is_contiguous(memory_format=memory_format) and ours[1].is_contiguous(memory_format=memory_format)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[3].abs().sum() > 0  # fc1's weight learns: the gate is not saturated


def test_in_place_relu6_matches_the_stock_one_without_copying_its_input() -> None:
    # Values on both bounds (0 and 6 exactly) and in between, reached through a weight so the
    # activation's input is a non-leaf, as after a BN.
    w = torch.tensor(2.0, requires_grad=True)
    base = torch.linspace(-1.0, 4.0, 21)  # *2: -2 .. 8 in steps of 0.5, 0 and 6 included
    grad_out = torch.randn(21)

    def run(act: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool]:
        w.grad = None
        h = base * w
        with torch.profiler.profile() as prof:
            out = act(h)
        (out * grad_out).sum().backward()
        cloned = any(e.name == "aten::clone" for e in prof.events())
        return out.detach(), w.grad.clone(), cloned

    ours = InPlaceReLU6().train()
    out, grad, cloned = run(ours)
    ref_out, ref_grad, _ = run(nn.ReLU6())
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert not cloned  # the point of the class: no copy of the input under autograd
    assert run(nn.ReLU6(inplace=True))[2]  # what the stock in-place op does, so the check above can fail
    with torch.no_grad():
        assert torch.equal(ours.eval()(base * 2.0), ref_out)
