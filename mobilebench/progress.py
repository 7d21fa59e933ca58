"""What a training run shows while it runs: a progress bar or log lines, then the time table."""

from __future__ import annotations

import logging
import sys
from typing import Any

from mobilebench.config import TrainerConfig
from mobilebench.runtime import World

log = logging.getLogger("mobilebench")


def make_progress(t: TrainerConfig, world: World, steps_per_epoch: int, multirun: bool):  # noqa: ANN201
    """Per-epoch step callback: a tqdm bar on a terminal, plain log lines otherwise."""
    mode, epochs = t.progress, t.epochs
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() and not multirun else "log"
    steps = min(steps_per_epoch, t.max_steps_per_epoch or steps_per_epoch)

    def factory(epoch: int):  # noqa: ANN202
        if not world.is_main:
            return lambda info: None
        if mode == "bar":
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)

            def update(info: dict[str, float]) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.3f}", acc=f"{info['acc']:.3f}", lr=f"{info['lr']:.3g}",
                                img_s=f"{info['images'] / max(info['seconds'], 1e-9):.0f}", refresh=False)
                if bar.n >= steps:
                    bar.close()
            return update

        count = [0]

        def log_line(info: dict[str, float]) -> None:
            count[0] += 1
            if count[0] % t.log_every == 0 or count[0] == steps:
                log.info("epoch %d step %d/%d loss %.4f acc %.4f lr %.4g %.0f img/s", epoch, count[0], steps,
                         info["loss"], info["acc"], info["lr"], info["images"] / max(info["seconds"], 1e-9))
        return log_line

    return factory


def print_time_report(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{s['model']} on {s['data']}: where the time went", show_header=True)
    for col in ("", "seconds", "share"):
        table.add_column(col, justify="right" if col else "left")
    # The final test pass is its own row: with data.val_size=0 (the CIFAR-10 recipes) it is all the evaluation.
    # A distilled run splits compute into the teacher's forward and the student's own step.
    teacher_s = s.get("teacher_s")
    compute = ((("teacher forward", teacher_s), ("student forward/backward/step", s["compute_s"] - teacher_s))
               if teacher_s is not None else (("forward/backward/step", s["compute_s"]),))
    rows = (("data (batching + augmentation)", s["data_s"]), *compute,
            ("validation", s["eval_s"]), ("final test" + (f" (+ {s['tta']} TTA)" if s["test_acc_tta"] is not None else ""),
                                          s["test_s"]))
    total = sum(secs for _, secs in rows)
    for name, secs in rows:
        table.add_row(name, f"{secs:.1f}", f"{100 * secs / max(total, 1e-9):.0f}%")
    console = Console(stderr=True)
    console.print(table)
    val = f"{s['best_val_acc']:.4f}" if s["best_val_acc"] is not None else "n/a"
    console.print(f"train {s['images_per_s'] or 0:.0f} images/s ({s['device']}, {s['precision']}, {s['threads']} threads); "
                  f"best val acc {val}; test acc {s['test_acc']:.4f} (top-5 {s['test_top5']:.4f})"
                  + (f"; with {s['tta']} TTA {s['test_acc_tta']:.4f}" if s["test_acc_tta"] is not None else ""))
