"""The native depthwise weight gradient (models/native.py) and the training path that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune

from mobilebench.models import ConvBNAct, build_model, native


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
        assert native.unavailable_reason() == ""


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
def test_depthwise_training_path_matches_the_stock_conv(stride: int, kernel_calls: list[tuple]) -> None:
    calls = kernel_calls
    torch.manual_seed(0)
    block = ConvBNAct(24, 24, kernel_size=5, stride=stride, groups=24, activation="hardswish").train()
    block = block.to(memory_format=torch.channels_last)
    assert block.native_weight_grad
    x = torch.randn(4, 24, 9, 9).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(4, 24, 9 // stride + 9 % stride, 9 // stride + 9 % stride)

    def run(native_path: bool, memory_format: torch.memory_format = torch.channels_last) -> list[torch.Tensor]:
        block.zero_grad()
        block.native_weight_grad = native_path
        leaf = x.clone(memory_format=memory_format).requires_grad_()
        out = block(leaf * 1.5)  # a non-leaf input, as after an activation
        (out * grad_out).sum().backward()
        return [out.detach(), leaf.grad, *(q.grad for q in block.parameters())]

    ours, ref = run(True), run(False)
    assert len(calls) == 1  # the native kernel ran once, for the one conv, and only on the native path
    assert all(t is not None for t in ours) and ours[1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # NCHW input, eval and no-grad take the stock conv.
    run(True, torch.contiguous_format)
    block.eval()
    block(x.clone().requires_grad_())
    block.train()
    with torch.no_grad():
        block(x)
    assert len(calls) == 1


def test_only_v3s_5x5_depthwise_convs_take_the_native_gradient() -> None:
    counts = {name: sum(isinstance(m, ConvBNAct) and m.native_weight_grad for m in build_model(name).modules())
              for name in ("v1", "v2", "v3_small", "v3_large")}
    assert counts == {"v1": 0, "v2": 0, "v3_small": 8, "v3_large": 6}


def test_the_build_is_cached_and_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cc = native._compiler()
    if cc is None:
        pytest.fail("no C compiler to test the build with; this machine's image ships gcc")
    monkeypatch.setenv("MOBILEBENCH_CACHE", str(tmp_path))
    native._load(cc)
    built = list((tmp_path / "native").glob("*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._load(cc)  # the second load reuses the library
    assert [(p, p.stat().st_mtime_ns) for p in (tmp_path / "native").glob("*")] == [(built[0], mtime)]

    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native._library.cache_clear()
    try:
        assert native.unavailable_reason() == f"disabled by {native.DISABLE_ENV}"
        assert not native.supports(torch.zeros(1, 1, 1, 1))
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_hooked_or_pruned_convs_keep_the_stock_call(kernel_calls: list[tuple]) -> None:
    calls = kernel_calls
    block = ConvBNAct(16, 16, kernel_size=5, groups=16).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()

    seen = []
    handle = block.conv.register_forward_hook(lambda *_: seen.append(1))
    block(x).sum().backward()
    assert seen == [1] and calls == []  # the hook ran, so the module was called
    handle.remove()

    # torch.nn.utils.prune recomputes `weight` from weight_orig * mask in a pre-hook.
    torch.nn.utils.prune.l1_unstructured(block.conv, "weight", amount=0.5)
    block(x).sum().backward()
    block(x).sum().backward()  # a stale weight tensor would fail here (its graph is freed)
    assert calls == [] and block.conv.weight_orig.grad is not None
    torch.nn.utils.prune.remove(block.conv, "weight")
    block(x).sum().backward()
    assert len(calls) == 1
