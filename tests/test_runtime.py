"""Process-level runtime settings: glibc's allocator policy for big CPU tensors, and `auto` precision."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mobilebench import machine
from mobilebench.accel.allocator import _glibc
from mobilebench.errors import UserError
from mobilebench.runtime import resolve_precision

# Runs in a fresh process: glibc's policy is process-wide and sticky once set.
PROBE = r"""
import ctypes, json, torch
from mobilebench.accel.allocator import set_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
BIG = 64 << 20

def probe():
    before = libc.mallinfo2().hblkhd
    t = torch.ones(BIG, dtype=torch.uint8)
    mmapped = libc.mallinfo2().hblkhd - before
    del t
    return {"mmapped": mmapped, "kept_free": libc.mallinfo2().fordblks}

out = {"fresh": probe()}
assert set_cpu_allocator("cache")
out["cache"] = probe()
assert set_cpu_allocator("system")
out["system"] = probe()
print(json.dumps(out))
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator policy is a glibc setting")
def test_cache_keeps_big_tensors_off_mmap_and_system_restores_it() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    big = 64 << 20
    # glibc's default: a 64 MiB tensor is its own mmap, unmapped again on free.
    assert out["fresh"]["mmapped"] >= big
    # cache: served from the heap and kept there for the next step's tensors.
    assert out["cache"]["mmapped"] == 0 and out["cache"]["kept_free"] >= big
    # system again: big tensors are their own mmaps once more.
    assert out["system"]["mmapped"] >= big


def test_unknown_allocator_mode_is_refused() -> None:
    from mobilebench.accel.allocator import set_cpu_allocator

    if _glibc() is None:
        assert set_cpu_allocator("cache") is False
        return
    with pytest.raises(ValueError, match="unknown cpu allocator"):
        set_cpu_allocator("jemalloc")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    # Native bf16 or not: bf16 cost a point of accuracy on the v3_small recipe (see resolve_precision).
    # The CPU's own probes are what any bf16-aware rule would read; patch them, and check the patch took.
    for module in (torch.cpu, getattr(torch._C, "_cpu", None)):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            if module is not None and hasattr(module, probe):
                monkeypatch.setattr(module, probe, lambda: native)
    assert machine.cpu_has_native_bf16() is native
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    # An explicit choice always wins.
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UserError, match="fp16 is not supported on CPU"):
        resolve_precision("fp16", cpu)
