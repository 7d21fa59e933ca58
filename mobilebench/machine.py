"""Facts about the machine a figure was measured on: CPU model and flags, device name, load.

One reader of /proc/cpuinfo for the whole package: run reports (summary.json, bench.json,
latency.json, quantize.json) and the native kernel's build key all take their CPU facts from here.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch


@functools.cache
def _first_cpu_block() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if facts:
                        break  # every core repeats the first one's block
                    continue
                key, _, value = line.partition(":")
                facts.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return facts


def cpu_name() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9R14 96-Core Processor'."""
    info = _first_cpu_block()
    return info.get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """x86 feature flags (ARM: its Features line); empty where /proc/cpuinfo is missing."""
    info = _first_cpu_block()
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_identity() -> str:
    """What a binary built with -march=native depends on: the ISA, the CPU model and its flags."""
    info = _first_cpu_block()
    fields = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(f"{k}: {info[k]}\n" for k in fields if k in info)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (recorded in bench.json; see runtime.resolve_precision)."""
    import torch.cpu

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    # torch.cpu holds these probes in current releases; older ones kept them in torch._C._cpu.
    probes = [getattr(mod, name, None) for mod in (torch.cpu, getattr(torch._C, "_cpu", None)) for name in checks]
    return any(probe() for probe in probes if callable(probe))


def device_name(device: torch.device, cpu_model: bool = True) -> str:
    """`cuda:<GPU name>`, `cpu:<CPU model>` (`cpu` without `cpu_model`), or the device type."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu" and cpu_model:
        return f"cpu:{cpu_name()}"
    return device.type


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was while a figure was taken."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_note() -> dict[str, Any]:
    """The machine facts deployment reports carry beside their timings."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ort_version: str | None = version("onnxruntime")
    except PackageNotFoundError:
        ort_version = None
    isa = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "onnxruntime": ort_version, "python": platform.python_version()}
