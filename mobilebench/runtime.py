"""Device, precision, threads and process-group choices, resolved from `auto` by what the machine has."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from mobilebench.errors import UserError

# Rank 0's start time, shared with every rank so `${now:}`-style run dirs agree (conf/config.yaml).
RUN_STAMP_ENV = "MOBILEBENCH_RUN_STAMP"
# Escape hatch for the process-group backend (e.g. gloo to run several ranks on one GPU).
BACKEND_ENV = "MOBILEBENCH_DIST_BACKEND"
# GPU index for a single-process run (one GPU per parallel sweep job).
GPU_ENV = "MOBILEBENCH_GPU"

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, world: World = World()) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto")
        # A DDP rank takes its local rank's GPU; a sweep job takes MOBILEBENCH_GPU (set per job with
        # hydra.job.env_set.MOBILEBENCH_GPU=${hydra:job.num}), wrapped around the visible GPUs.
        gpus, ranks_here = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if world.size > 1 and ranks_here > gpus and "nccl" in dist_backend("cuda"):
            raise UserError(f"{ranks_here} ranks on this node but {gpus} GPU(s) visible; NCCL needs one GPU per rank: "
                            f"use torchrun --nproc_per_node={gpus}, or trainer.device=cpu")
        gpu = world.local_rank if world.size > 1 else int(os.environ.get(GPU_ENV) or 0)
        return torch.device("cuda", gpu % gpus)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device=mps but MPS is not available; use trainer.device=cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (recorded in bench.json; see resolve_precision)."""
    import torch.cpu

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    # torch.cpu holds these probes in current releases; older ones kept them in torch._C._cpu.
    probes = [getattr(mod, name, None) for mod in (torch.cpu, getattr(torch._C, "_cpu", None)) for name in checks]
    return any(probe() for probe in probes if callable(probe))


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 (fp16 where unsupported) on CUDA, fp32 on CPU.

    fp32 on CPU by measurement, even with native bf16. On an AVX512-BF16 EPYC (2 threads, batch
    128, channels_last, allocator `cache`) bf16 autocast makes a 32px training step 1.54x faster
    for v2 and 1.16x for v3_small (once the depthwise convs whose bf16 backward is slow stay in
    fp32: `mobilebench.models.blocks.fp32_under_cpu_autocast`), but it costs accuracy: the
    38-epoch v3_small recipe reached 86.49% test in bf16 against 87.52% in fp32, for 7% less time
    (progressive resizing spends most epochs at 16-24px, where bf16 gains only 1.08-1.13x).
    `trainer.precision=bf16` is there for whoever prefers the speed. AVX2-only CPUs emulate bf16
    at about 0.12x.
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UserError("trainer.precision=fp16 is not supported on CPU; use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def resolve_compile(name: str, device: torch.device) -> bool:
    # On CPU the inductor compile of these small nets costs minutes and gains little; on CUDA it
    # removes the launch overhead that dominates 32x32 batches.
    return name == "on" or (name == "auto" and device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's own ceilings for its sliding mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and the
# trim threshold it pairs with it, and its default cap on mmapped chunks.
_GLIBC_MMAP_THRESHOLD_MAX, _GLIBC_MMAP_MAX = 32 << 20, 65536
_allocator_mode = "system"  # this process's; glibc's untouched policy until set_cpu_allocator changes it


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and others lack them
    except (OSError, AttributeError):
        return None
    return libc


def set_cpu_allocator(mode: str) -> bool:
    """How glibc's malloc treats big CPU tensors; returns False where it cannot be set (not glibc).

    `cache`: never mmap, never trim. By default glibc serves every allocation above its mmap
    threshold (32 MiB at most) with a fresh mmap and unmaps it on free, so each step page-faults
    its largest activations in anew (v3_small's first expanded map at batch 128 is 38 MB; v2's are
    larger). Keeping freed memory, as a caching allocator would, measured on a 2-core EPYC:
    BatchNorm forward on [128, 72, 32, 32] 14.3 -> 3.8 ms; a whole channels_last training step
    431 -> 650 images/s for v3_small and 91 -> 223 for v2. The process keeps its peak heap.
    `system`: glibc's own policy. In a process that ran `cache` (`mobilebench bench` switches per
    side; an in-process sweep), its steady state is restored: mmap above 32 MiB, trim above 64 MiB,
    cached memory handed back. Not bit-for-bit a fresh process: glibc's threshold stops sliding
    once set, and measured faster than a fresh process (see README, Performance).
    """
    global _allocator_mode
    libc = _glibc()
    if libc is None:
        return False
    if mode == _allocator_mode == "system":
        return True
    if mode == "cache":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    elif mode == "system":
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
    else:
        raise ValueError(f"unknown cpu allocator mode {mode!r}")
    _allocator_mode = mode
    return True


def launched_size() -> int:
    """World size torchrun (WORLD_SIZE) or a multi-task submitit/SLURM job gave this process; 1 otherwise."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().num_tasks
    return 1


def dist_backend(device_name: str) -> str:
    """gloo on CPU; on CUDA machines nccl for CUDA tensors plus gloo for CPU ones (object broadcasts,
    a `trainer.device=cpu` run), so the group can be joined before the config picks the device."""
    if os.environ.get(BACKEND_ENV):
        return os.environ[BACKEND_ENV]
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_world(device_name: str = "auto") -> World:
    """Join the process group when launched as several ranks (torchrun, or submitit tasks_per_node > 1)."""
    if launched_size() <= 1:
        return World()
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # Keep CUDA_VISIBLE_DEVICES as SLURM set it; resolve_device maps local rank -> GPU.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = dist_backend(device_name)
        if "nccl" in backend:
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend)
    if not world.is_main:
        # One voice: rank 0 logs; the others only report warnings and errors.
        logging.getLogger("mobilebench").setLevel(logging.WARNING)
    return world


def share_run_stamp(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str | None:
    """Under torchrun, give every rank rank 0's start time in MOBILEBENCH_RUN_STAMP.

    Each rank runs Hydra, and each would read its own clock for the run dir; ranks that start a
    second apart would write two run dirs. Call before Hydra composes the run dir.
    """
    if launched_size() <= 1 or "WORLD_SIZE" not in os.environ:
        return None
    if RUN_STAMP_ENV not in os.environ:
        import torch.distributed as dist

        init_world()
        stamp = [datetime.now().strftime(fmt)]
        dist.broadcast_object_list(stamp, src=0)
        os.environ[RUN_STAMP_ENV] = stamp[0]
    return os.environ[RUN_STAMP_ENV]


def shared_run_dir(run_dir: Path, world: World) -> Path:
    """Rank 0's run dir on every rank, so all ranks resume from and test the checkpoints rank 0 wrote."""
    if world.size <= 1:
        return run_dir
    import torch.distributed as dist

    path = [str(run_dir)]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def torchrun_overrides() -> list[str]:
    """Hydra overrides for a torchrun rank: one shared run dir, and only rank 0 writes Hydra's files there."""
    if share_run_stamp() is None or int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cpu":
        raise UserError("trainer.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU kernel; drop it for CPU runs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def world_reduce(values: dict[str, float], world: World, device: torch.device, op: str = "mean") -> dict[str, float]:
    """Mean or sum of per-rank numbers over all ranks (identity in a single process)."""
    if world.size <= 1 or not values:
        return dict(values)
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if op == "mean":
        t /= world.size
    return dict(zip(values, t.tolist()))
