"""Measure the CPU training defaults: memory format, bf16 autocast, thread count, torch.compile.

Each variant is one engine training step (`engine.train_one_epoch` on `trainer.build_trainer`'s
parts, fast paths included, batch size 128 by default) timed side by side with the
others in the same process, in alternating rounds, so load from other processes on a shared
machine hits every variant alike. torch.compile runs in a child process under a time limit:
it reports the compile time and its steady-state speed against eager in that child.

    python scripts/bench_cpu_defaults.py --models v2 v3_small --out bench_cpu_defaults.json
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_cpu_defaults.py ...   # OpenMP threads sleep, not spin
    python scripts/bench_cpu_defaults.py --allocator cache ...          # glibc keeps freed memory

The allocator policy (`trainer.cpu_allocator`) is process-wide and sticky, so it is a flag for the
whole process, not a variant: `system` leaves glibc untouched (a fresh process), `cache` is
mobilebench's default. Compare the two by running the script once with each, alternately.

Variants are named layout-precision-threads, e.g. cl-fp32-t2 (channels_last, fp32, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilebench import engine
from mobilebench.accel import set_cpu_allocator
from mobilebench.config import Config, ModelConfig, TrainerConfig
from mobilebench.trainer import build_from_config, build_trainer

DEFAULT_VARIANTS = ["nchw-fp32-t2", "cl-fp32-t2", "nchw-fp32-t1", "cl-fp32-t1", "cl-bf16-t2", "nchw-bf16-t2"]


@dataclass(frozen=True)
class Variant:
    channels_last: bool
    precision: str
    threads: int

    @classmethod
    def parse(cls, name: str) -> Variant:
        layout, precision, threads = name.split("-")
        if layout not in ("cl", "nchw") or precision not in ("fp32", "bf16") or not threads.startswith("t"):
            raise SystemExit(f"bad variant {name!r}; use layout-precision-threads like cl-fp32-t2")
        return cls(layout == "cl", precision, int(threads[1:]))


def make_parts(model_name: str, variant: Variant, steps_per_epoch: int, compiled: bool = False) -> engine.Parts:
    """Parts the way `mobilebench train` builds them from the default config (SGD, nesterov, cosine)."""
    cfg = Config(model=ModelConfig(name=model_name),
                 trainer=TrainerConfig(channels_last=variant.channels_last, precision=variant.precision,
                                       compile="on" if compiled else "off", bn_momentum=None))
    torch.manual_seed(0)
    return build_trainer(cfg, build_from_config(cfg.model, 10), torch.device("cpu"), variant.precision,
                         steps_per_epoch).parts


def batches(batch_size: int, channels_last: bool, n: int = 4, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, size, size, generator=gen)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    torch.randint(0, 10, (batch_size,), generator=gen)))
    return out


class Cycle:
    def __init__(self, items: list, n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204
        return (self.items[i % len(self.items)] for i in range(self.n))


def run_steps(parts: engine.Parts, data: list, steps: int) -> float:
    """Seconds for `steps` engine steps."""
    stats = engine.train_one_epoch(parts, Cycle(data, steps), engine.TrainState(), engine.StopFlag(), lambda info: None)
    return stats.seconds


def measure_variants(model_name: str, names: list[str], batch_size: int, steps: int, warmup: int,
                     rounds: int, size: int = 32) -> dict[str, dict]:
    variants = {n: Variant.parse(n) for n in names}
    parts = {n: make_parts(model_name, v, steps) for n, v in variants.items()}
    data = {n: batches(batch_size, v.channels_last, size=size) for n, v in variants.items()}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            torch.set_num_threads(variants[n].threads)
            run_steps(parts[n], data[n], warmup)
            seconds[n].append(run_steps(parts[n], data[n], steps))
            print(f"  {model_name} {n} round {r + 1}: {batch_size * steps / seconds[n][-1]:.1f} img/s", flush=True)
    return {n: {"images_per_s": batch_size * steps * rounds / sum(s),
                "per_round": [batch_size * steps / x for x in s]} for n, s in seconds.items()}


def compile_child(model_name: str, batch_size: int, steps: int, threads: int) -> None:
    """Runs in the child: eager vs compiled steps, alternating, after timing the compile itself."""
    torch.set_num_threads(threads)
    variant = Variant(True, "fp32", threads)
    data = batches(batch_size, True)
    eager = make_parts(model_name, variant, steps)
    compiled = make_parts(model_name, variant, steps, compiled=True)
    t0 = time.perf_counter()
    run_steps(compiled, data, 2)  # forward and backward graphs compile on the first step
    compile_s = time.perf_counter() - t0
    run_steps(eager, data, 1)
    times = {"eager": 0.0, "compiled": 0.0}
    for r in range(2):
        for name, parts in (("eager", eager), ("compiled", compiled)) if r == 0 else (("compiled", compiled), ("eager", eager)):
            times[name] += run_steps(parts, data, steps)
    n = 2 * steps * batch_size
    print(json.dumps({"compile_s": compile_s, "eager_images_per_s": n / times["eager"],
                      "compiled_images_per_s": n / times["compiled"], "threads": threads}))


def measure_compile(model_name: str, batch_size: int, steps: int, threads: int, limit_s: float,
                    allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--compile-child", model_name, "--batch-size", str(batch_size),
           "--steps", str(steps), "--threads", str(threads), "--allocator", allocator]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"status": f"over the {limit_s:.0f} s limit", "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["speedup"] = result["compiled_images_per_s"] / result["eager_images_per_s"]
    result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["v2", "v3_small"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32, help="side of the synthetic batches (progressive resizing trains at 16-28)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile-limit", type=float, default=0.0, help="seconds for the torch.compile child; 0 skips it")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the compile child")
    p.add_argument("--allocator", choices=["system", "cache"], default="system",
                   help="glibc policy for this process: system = untouched, cache = trainer.cpu_allocator=cache")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    set_cpu_allocator(args.allocator)  # "system" in a fresh process leaves glibc untouched
    if args.compile_child:
        compile_child(args.compile_child, args.batch_size, args.steps, args.threads)
        return

    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    result = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_count": os.cpu_count(), "env": env, "batch_size": args.batch_size, "image_size": args.image_size,
              "steps": args.steps, "rounds": args.rounds, "allocator": args.allocator, "load_average": list(os.getloadavg()), "models": {}}
    for model_name in args.models:
        entry = {"variants": measure_variants(model_name, args.variants, args.batch_size, args.steps, args.warmup,
                                              args.rounds, args.image_size)}
        if args.compile_limit > 0:
            entry["compile"] = measure_compile(model_name, args.batch_size, args.steps, args.threads, args.compile_limit,
                                               args.allocator)
        result["models"][model_name] = entry
    result["load_average_end"] = list(os.getloadavg())
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for model_name, entry in result["models"].items():
        table = Table(title=f"{model_name}: training step, batch {result['batch_size']} at "
                            f"{result['image_size']}px, images/s "
                            f"(allocator {result['allocator']}, "
                            f"OMP_WAIT_POLICY={result['env']['OMP_WAIT_POLICY'] or 'unset'})")
        table.add_column("variant")
        table.add_column("images/s", justify="right")
        table.add_column("vs nchw-fp32-t2", justify="right")
        ref = entry["variants"].get("nchw-fp32-t2", {}).get("images_per_s")
        for name, v in entry["variants"].items():
            table.add_row(name, f"{v['images_per_s']:.1f}", f"{v['images_per_s'] / ref:.2f}x" if ref else "")
        console.print(table)
        if "compile" in entry:
            console.print(f"torch.compile: {entry['compile']}")
    console.print(f"load average {result['load_average']} -> {result['load_average_end']}, torch {result['torch']}, "
                  f"{result['cpu_capability']}, {result['cpu_count']} CPUs")


if __name__ == "__main__":
    main()
