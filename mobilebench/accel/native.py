"""A small C kernel for the one training op oneDNN runs badly here: depthwise 5x5 weight gradients.

oneDNN's depthwise backward-weights is slow on V3's 5x5 layers at CIFAR sizes; the plain loop in
`depthwise_grad.c`, compiled for the host CPU, is 2-4x faster there and no faster on 3x3 layers,
so `mobilebench.accel` uses it for 5x5 and up only (figures: docs/performance.md).

The library is built on first use with the system C compiler (`$CC` or `cc`) into a per-user
cache keyed by the source, the compiler, its flags and the CPU, and loaded with ctypes. No compiler,
a failed build, or `MOBILEBENCH_NATIVE_KERNELS=0` leaves oneDNN's kernel in place
(`unavailable_reason` says why). Work is split over images across `torch.get_num_threads()`
threads; ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mobilebench.machine import cpu_identity

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("depthwise_grad.c")
DISABLE_ENV = "MOBILEBENCH_NATIVE_KERNELS"
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_HOST_FLAGS = ("-march=native",)  # dropped on compilers that reject it


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cmd = shlex.split(cc)
    return cmd if cmd and shutil.which(cmd[0]) else None


def cache_dir() -> Path:
    root = os.environ.get("MOBILEBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mobilebench")
    return Path(root) / "native"


def _build(cc: list[str], flags: tuple[str, ...], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent ranks never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(cc: list[str]) -> ctypes.CDLL:
    source_key = hashlib.sha256(SOURCE.read_bytes())
    source_key.update(repr((cc, cpu_identity())).encode())
    errors = []
    for flags in (_FLAGS + _HOST_FLAGS, _FLAGS):
        key = source_key.copy()
        key.update(repr(flags).encode())
        path = cache_dir() / f"depthwise_grad-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                _build(cc, flags, path)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError) as e:
            stderr = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else ""
            errors.append(f"{' '.join(flags)}: {stderr.splitlines()[-1] if stderr else e}")
    else:
        raise OSError("; ".join(errors))
    fn = lib.depthwise_weight_grad
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 10
    fn.restype = None
    return lib


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {DISABLE_ENV}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC or install cc/gcc/clang)"
    try:
        lib = _load(cc)
    except OSError as e:
        log.info("native depthwise kernel not built, using oneDNN's: %s", e)
        return None, f"build failed: {e}"
    return lib, ""


def unavailable_reason() -> str:
    """Empty when the native kernel is in use; otherwise why oneDNN's kernel runs instead."""
    return _library()[1]


def supports(t: torch.Tensor) -> bool:
    """Whether the native kernel can read ``t`` in place: dense channels_last fp32 on the CPU."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last) and _library()[0] is not None)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1), thread_name_prefix="mobilebench-dw")


def depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, kernel_size: int, stride: int,
                          padding: int) -> torch.Tensor:
    """Gradient of a bias-free depthwise conv's [C, 1, K, K] weight from its input and output gradient.

    Both tensors must pass :func:`supports`. The result equals oneDNN's up to summation order.
    """
    lib = _library()[0]
    assert lib is not None and supports(grad) and supports(x)
    n, c, h, w = x.shape
    ho, wo = grad.shape[2:]
    k = kernel_size
    parts = max(1, min(torch.get_num_threads(), n))
    acc = torch.zeros(parts, k * k, c)
    bounds = [n * i // parts for i in range(parts + 1)]

    def run(i: int) -> None:
        lib.depthwise_weight_grad(grad.data_ptr(), x.data_ptr(), acc[i].data_ptr(), bounds[i], bounds[i + 1],
                                  c, h, w, ho, wo, k, stride, padding)

    futures = [_pool().submit(run, i) for i in range(1, parts)]
    run(0)
    for f in futures:
        f.result()
    return acc.sum(0).t().reshape(c, 1, k, k)
