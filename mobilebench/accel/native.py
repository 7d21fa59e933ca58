"""A small C kernel for the one training op oneDNN runs badly here: depthwise 5x5 weight gradients.

oneDNN's depthwise backward-weights is slow on V3's 5x5 layers at CIFAR sizes; the plain loop in
`depthwise_grad.c`, compiled for the host CPU, is 2-4x faster there and no faster on 3x3 layers,
so `mobilebench.accel` uses it for 5x5 and up only (figures: docs/performance.md).

The library is built on first use with the system C compiler (`$CC` or `cc`) into a per-user
cache keyed by the source, the compiler, its flags and the CPU, and loaded with ctypes. Loading a
library runs its code, and its name is predictable, so a cached build is loaded only from a dir and
file owned by this user and writable by nobody else, and only when it matches the SHA-256 recorded
beside it when it was built; otherwise it is rebuilt, into a fresh private dir when the cache dir
itself is not private (the log says so once). No compiler,
a failed build, or `MOBILEBENCH_NATIVE_KERNELS=0` leaves oneDNN's kernel in place
(`unavailable_reason` says why). Work is split over images across `torch.get_num_threads()`
threads; ctypes releases the GIL during each call.
"""

from __future__ import annotations

import atexit
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
from mobilebench.runfiles import foreign_owner

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


def not_private(path: Path) -> str | None:
    """None when `path` is owned by this user and writable by nobody else; otherwise why not.

    A library this process loads runs its code in the training process, so a cached build is
    trusted only where nobody but its owner could have put it (or a digest beside it) there.
    """
    owner = foreign_owner(path)
    if owner is not None:
        return f"owned by uid {owner}, not by this user"
    st = path.stat()
    if st.st_mode & 0o022:
        return f"writable by {'group and others' if st.st_mode & 0o022 == 0o022 else 'group' if st.st_mode & 0o020 else 'others'}"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _verified(library: Path) -> bool:
    """A build of ours: the file and its recorded SHA-256 are private and agree."""
    digest = _digest_path(library)
    if not (library.is_file() and digest.is_file()) or not_private(library) or not_private(digest):
        return False
    return digest.read_text().strip() == _sha256(library)


def _build(cc: list[str], flags: tuple[str, ...], out: Path) -> None:
    """Compile into `out` with its SHA-256 beside it; both land by rename, so concurrent ranks
    never load a half-written library."""
    temporary: list[str] = []
    try:
        fd, library = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        temporary.append(library)
        subprocess.run([*cc, *flags, str(SOURCE), "-o", library], check=True, capture_output=True, text=True,
                       timeout=120)
        os.chmod(library, 0o700)
        fd, digest = tempfile.mkstemp(suffix=".sha256", dir=out.parent)  # created 0600
        temporary.append(digest)
        with os.fdopen(fd, "w") as f:
            f.write(_sha256(Path(library)) + "\n")
        os.replace(library, out)
        os.replace(digest, _digest_path(out))
    finally:
        for path in temporary:
            if os.path.exists(path):
                os.unlink(path)


def _build_dir() -> Path:
    """The cache dir when it is private to this user; otherwise a fresh private dir (mode 0700)."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = not_private(root)
    except OSError as err:
        reason = f"not usable ({err.strerror or err})"
    if reason is None:
        return root
    private = Path(tempfile.mkdtemp(prefix="mobilebench-native-"))
    atexit.register(shutil.rmtree, private, True)  # this process's own build; a loaded library needs no file
    log.warning("native kernel cache %s is %s: its libraries are not trusted; building into %s instead",
                root, reason, private)
    return private


FLAG_SETS = (_FLAGS + _HOST_FLAGS, _FLAGS)  # tried in order


def library_name(cc: list[str], flags: tuple[str, ...]) -> str:
    """The cached build's file name: keyed by the source, the compiler, its flags and the CPU."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(repr((cc, cpu_identity())).encode())
    key.update(repr(flags).encode())
    return f"depthwise_grad-{key.hexdigest()[:16]}.so"


def _load(cc: list[str]) -> tuple[ctypes.CDLL, Path]:
    errors = []
    root = _build_dir()
    for flags in FLAG_SETS:
        path = root / library_name(cc, flags)
        try:
            if not _verified(path):  # absent, not private, or not the file we built: never loaded
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
    return lib, path


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str, Path | None]:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {DISABLE_ENV}", None
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC or install cc/gcc/clang)", None
    try:
        lib, path = _load(cc)
    except OSError as e:
        log.info("native depthwise kernel not built, using oneDNN's: %s", e)
        return None, f"build failed: {e}", None
    return lib, "", path


def library_path() -> Path | None:
    """The file the kernel was loaded from (None when it is not in use)."""
    return _library()[2]


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
