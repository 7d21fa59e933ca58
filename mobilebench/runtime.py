"""Device, precision, threads and process-group choices, resolved from `auto` by what the machine has."""

from __future__ import annotations

import logging
import os
import random
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


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 (fp16 where unsupported) on CUDA, fp32 on CPU.

    fp32 on CPU by measurement, even with native bf16 (AVX512-BF16, AMX): bf16 autocast makes
    training steps faster but cost the v3_small recipe about a point of test accuracy, and most of
    the recipe's epochs run at small image sizes where bf16 gains least (docs/performance.md).
    `trainer.precision=bf16` is there for whoever prefers the speed. AVX2-only CPUs emulate bf16.
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


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads in PyTorch (None: its default) and return the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def launched_size() -> int:
    """World size torchrun (WORLD_SIZE) or a multi-task submitit/SLURM job gave this process; 1 otherwise."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().num_tasks
    return 1


def launched_rank() -> int:
    """This process's rank as its launcher set it (torchrun's RANK, a submitit/SLURM task's global
    rank), before any process group exists; 0 for a single process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().global_rank
    return 0


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
