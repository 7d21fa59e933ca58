"""Each CPU fast path's gain on whole training steps, measured side by side in one process.

For every model, variants are built with `trainer.build_trainer` (the path `mobilebench train`
takes): all fast paths, and all but one. They take turns in rounds (the order rotates every round),
each turn a few untimed warm-up steps and then timed steps of `engine.train_one_epoch` on the
in-memory loader, so load drift hits every variant alike. The gain of a path is
images/s(all) / images/s(all but that path) - 1, on the medians of the rounds.
glibc's allocator policy is process-wide and sticky, so it is measured across fresh processes
instead: `--allocator cache|system` sets it once at the start and times the `all` variant only.

    python scripts/fast_paths_ab.py --models v2 v3_small v3_large --sizes 32 16 --rounds 5
    python scripts/fast_paths_ab.py --models v2 v3_small --precision bf16   # depthwise_fp32

Writes a JSON summary to --out (default: fast_paths_ab.json in the working dir).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from mobilebench import accel, engine
from mobilebench.bench import Take, forever
from mobilebench.config import AugmentConfig, Config, DataConfig, ModelConfig, OptimizerConfig, TrainerConfig
from mobilebench.data import load_data
from mobilebench.machine import cpu_name, load_average
from mobilebench.models import build_model
from mobilebench.trainer import build_train_loader, build_trainer, model_args


def variant_paths(model: str, precision: str) -> dict[str, tuple[set[str], str]]:
    """name -> (fast paths, allocator) for `all` and `all but X` for each X that applies."""
    applies = {"v1": set(), "v2": {"relu6"}, "v3_small": {"se", "depthwise_native"},
               "v3_large": {"se", "depthwise_native"}}[model]
    if precision == "bf16":
        applies = (applies - {"se", "relu6"}) | {"depthwise_fp32"}  # SE's and relu6's paths are fp32 only
    full = set(applies)
    out = {"all": (full, "cache")}
    for path in sorted(applies):
        out[f"all but {path}"] = (full - {path}, "cache")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["v2", "v3_small", "v3_large"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 16])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--allocator", choices=["cache", "system"], default=None,
                        help="time only `all`, in a process that runs under this glibc policy throughout")
    parser.add_argument("--out", default="fast_paths_ab.json")
    args = parser.parse_args()

    device = torch.device("cpu")
    accel.set_cpu_allocator(args.allocator or "cache")
    results: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "allocator": args.allocator or "cache",
                     "precision": args.precision, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                     "load_average_start": load_average(), "native": accel.native_state(), "models": {}}
    for name, size in itertools.product(args.models, args.sizes):
        cfg = Config(model=ModelConfig(name=name), data=DataConfig(name="synthetic", train_subset=4096, val_size=0,
                                                                   test_subset=16, image_size=32, batch_size=args.batch),
                     augment=AugmentConfig(), optimizer=OptimizerConfig(lr=0.1),
                     trainer=TrainerConfig(precision=args.precision, label_smoothing=0.1))
        data = load_data(cfg.data)
        variants = {}
        chosen = variant_paths(name, args.precision)
        if args.allocator:
            chosen = {"all": chosen["all"]}
        for label, (paths, _) in chosen.items():
            torch.manual_seed(0)
            loader = build_train_loader(cfg, data, device, torch.Generator().manual_seed(0))
            loader.image_size = size
            model = build_model(**model_args(cfg.model, data.num_classes))
            off = replace(cfg, trainer=replace(cfg.trainer, cpu_kernels="off"))
            trainer = build_trainer(off, model, device, args.precision, len(loader))
            counts = accel.convert(trainer.raw, device, trainer.parts.amp_dtype, paths)
            variants[label] = {"trainer": trainer, "batches": forever(loader), "swapped": counts, "rates": []}
        labels = list(variants)
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                v = variants[label]
                state, stop = engine.TrainState(), engine.StopFlag()
                engine.train_one_epoch(v["trainer"].parts, Take(v["batches"], args.warmup), state, stop, lambda i: None)
                t0 = time.perf_counter()
                stats = engine.train_one_epoch(v["trainer"].parts, Take(v["batches"], args.steps), state, stop,
                                               lambda i: None)
                v["rates"].append(stats.images / (time.perf_counter() - t0))
            print(name, size, r, {k: round(v["rates"][-1], 1) for k, v in variants.items()}, flush=True)
        med = {k: statistics.median(v["rates"]) for k, v in variants.items()}
        results["models"][f"{name}@{size}px"] = {
            "images_per_s_median": {k: round(x, 1) for k, x in med.items()},
            "rounds": {k: [round(x, 1) for x in v["rates"]] for k, v in variants.items()},
            "swapped": {k: v["swapped"] for k, v in variants.items()},
            "gain_pct": {k.removeprefix("all but "): round(100 * (med["all"] / x - 1), 1)
                         for k, x in med.items() if k != "all"},
        }
        print(json.dumps(results["models"][f"{name}@{size}px"]["gain_pct"]), flush=True)
    results["load_average_end"] = load_average()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
