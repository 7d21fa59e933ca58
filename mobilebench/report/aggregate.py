"""Grouping runs that differ only in seed, and the numbers of each row of the table."""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobilebench.errors import UserError
from mobilebench.report.runs import Run, get_path, shown_path

# Settings that change how fast or where a run goes, or where it writes, but not what it learns:
# runs that differ only in these (and the seed) are repeats of one configuration.
NOT_RECIPE = frozenset({
    "trainer.seed", "trainer.device", "trainer.precision", "trainer.compile", "trainer.threads",
    "trainer.progress", "trainer.log_every", "trainer.resume", "trainer.overwrite", "trainer.channels_last",
    "trainer.cpu_allocator", "trainer.cpu_kernels",
    "data.root", "data.download", "data.num_workers", "data.cache_dir", "data.device_resident",
    "command", "checkpoint",
})
NOT_RECIPE_SECTIONS = ("hydra", "summary", "bench", "export", "quantize", "prune")


@dataclass
class Row:
    """One line of the table: the runs of one configuration that share a status."""

    model: str
    label: str
    status: str
    runs: list[Run]
    recipe: dict[str, Any]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """Built once per report; `_merged` copies rather than mutates it."""
    from dataclasses import asdict

    from mobilebench.config import Config

    return asdict(Config())


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dataset_id(run: Run) -> str:
    """Which images a run saw: the data set name, plus the folder for an image folder."""
    name = get_path(run.config, "data.name") or run.summary.get("data") or "?"
    if name == "imagefolder":
        root = get_path(run.config, "data.root")
        return f"imagefolder:{Path(str(root))}" if root else name  # Path() drops a trailing slash
    return str(name)


def recipe(run: Run) -> dict[str, Any]:
    """What defines a run's configuration: its config minus seed, paths and speed-only settings."""
    if run.config is not None:
        # Over the schema's defaults, so a run made before a key existed compares equal to one
        # that has the key at its default.
        flat = {k: v for k, v in _flatten(_merged(_schema_defaults(), run.config)).items()
                if k not in NOT_RECIPE and k.split(".", 1)[0] not in NOT_RECIPE_SECTIONS}
    else:  # a copied run without .hydra/: the summary still names the essentials
        s = run.summary
        flat = {"model.name": s.get("model"), "model.width_mult": s.get("width_mult"), "model.stem": s.get("stem"),
                "data.image_size": s.get("image_size"), "trainer.epochs": s.get("epochs"),
                "data.batch_size": s.get("batch_size"), "data.train_images": s.get("train_images")}
    flat["data"] = dataset_id(run)
    flat.pop("data.name", None)
    return flat


def _hashable(recipe_: dict[str, Any]) -> str:
    return json.dumps(recipe_, sort_keys=True, default=str)


def check_data(runs: list[Run], allow_mixed: bool) -> None:
    counts: dict[str, int] = {}
    for run in runs:
        counts[dataset_id(run)] = counts.get(dataset_id(run), 0) + 1
    if len(counts) > 1 and not allow_mixed:
        listed = ", ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in sorted(counts.items()))
        raise UserError(f"runs on different data sets: {listed}; report each data set separately, "
                        "or pass --allow-mixed-data to put them in one table")


def group_runs(runs: list[Run]) -> list[Row]:
    """Completed runs sharing a recipe become one row; every other run is a row of its own."""
    groups: dict[tuple[str, str], list[Run]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for run in runs:
        r = recipe(run)
        key = _hashable(r)
        recipes[key] = r
        slot = (key, "completed") if run.status == "completed" else (key, f"{run.status}:{run.dir}")
        groups.setdefault(slot, []).append(run)
    varying = _varying_keys(list(recipes.values()))
    rows = [Row(model=members[0].model, label=_label(recipes[key], varying), status=members[0].status,
                runs=members, recipe=recipes[key]) for (key, _), members in groups.items()]
    return sorted(rows, key=_row_order)


def _varying_keys(recipes: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in recipes for k in r})
    return [k for k in keys if k != "model.name" and len({json.dumps(r.get(k), default=str) for r in recipes}) > 1]


SHORT_SECTIONS = ("model", "trainer", "data", "optimizer", "scheduler")  # `lr=0.05` rather than `optimizer.lr=0.05`


def _label(r: dict[str, Any], varying: list[str]) -> str:
    """The settings that set this row apart from the others, shortest key form."""
    parts = []
    for k in varying:
        section, _, rest = k.partition(".")
        short = rest if rest and section in SHORT_SECTIONS else k
        value = r.get(k)
        parts.append(f"{short}={'null' if value is None else value}")
    return " ".join(parts)


def _row_order(row: Row) -> tuple[Any, ...]:
    from mobilebench.models import MODEL_NAMES  # imports torch: only once there are rows to sort

    rank = MODEL_NAMES.index(row.model) if row.model in MODEL_NAMES else len(MODEL_NAMES)
    return (rank, row.model, row.label, row.status != "completed", str(row.runs[0].dir))


# --- numbers -----------------------------------------------------------------------------


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (None for fewer than two) and count of the numbers among `values`."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not nums:
        return None, None, 0
    return statistics.fmean(nums), (statistics.stdev(nums) if len(nums) > 1 else None), len(nums)


def best_val_so_far(run: Run) -> float | None:
    """best_val_acc from the summary, or from metrics.jsonl for a run that has not finished."""
    best = run.summary.get("best_val_acc")
    if isinstance(best, (int, float)):
        return float(best)
    vals = [m["val_acc"] for m in run.metrics if isinstance(m.get("val_acc"), (int, float))]
    return max(vals) if vals else None


def macs_at(run: Run, image_size: int, cache: dict[str, int | None]) -> int | None:
    """MACs of the run's own network (same stem, width, pruning) on an image_size input."""
    args = _model_args(run)
    if args is None:
        return None
    key = _hashable({**args, "image_size": image_size})
    if key not in cache:
        import torch

        from mobilebench.models import build_model
        from mobilebench.profile import count_macs

        try:
            # On the meta device nothing is computed: a 224px pass of a stride-1-stem net costs no time.
            with torch.device("meta"):
                model = build_model(**args)
            cache[key] = count_macs(model, image_size)
        except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError):
            cache[key] = None
    return cache[key]


def _model_args(run: Run) -> dict[str, Any] | None:
    for name in ("best.pt", "last.pt"):
        path = run.dir / "checkpoints" / name
        if path.is_file():
            try:
                from mobilebench.checkpoint import load_checkpoint

                args = load_checkpoint(path, "cpu").get("model_args")
                if isinstance(args, dict):
                    return dict(args)
            except (UserError, OSError, RuntimeError, ValueError):
                pass
    name = run.summary.get("model") or get_path(run.config, "model.name")
    if not name:
        return None
    args: dict[str, Any] = {"name": name, "num_classes": _num_classes(run),
                            "width_mult": run.summary.get("width_mult", get_path(run.config, "model.width_mult") or 1.0),
                            "stem": run.summary.get("stem", get_path(run.config, "model.stem") or "cifar")}
    hidden = get_path(run.config, "model.hidden_channels")
    if hidden:
        args["hidden_channels"] = list(hidden)
    return args


def _num_classes(run: Run) -> int:
    for key in ("model.num_classes", "data.num_classes"):
        value = get_path(run.config, key)
        if isinstance(value, int):
            return value
    return 100 if dataset_id(run) == "cifar100" else 10


def row_values(row: Row, macs_cache: dict[str, int | None]) -> dict[str, Any]:
    """The numbers of one row; accuracies in percent, time in minutes, None where unknown."""
    runs, s0 = row.runs, row.runs[0].summary
    image_size = s0.get("image_size") or get_path(row.runs[0].config, "data.image_size")
    val = mean_std(best_val_so_far(r) for r in runs)
    test = mean_std(r.summary.get("test_acc") for r in runs)
    test_tta = mean_std(r.summary.get("test_acc_tta") for r in runs)
    int8 = mean_std(r.deploy.int8_acc for r in runs)
    drop = mean_std(r.deploy.fp32_acc - r.deploy.int8_acc for r in runs
                    if r.deploy.fp32_acc is not None and r.deploy.int8_acc is not None)
    train_min = mean_std((r.summary.get("train_s") or math.nan) / 60 for r in runs)
    ips = mean_std(r.summary.get("images_per_s") for r in runs)
    latency = mean_std(r.deploy.latency_ms for r in runs)
    int8_latency = mean_std(r.deploy.int8_latency_ms for r in runs)
    macs = s0.get("macs")
    if not isinstance(macs, int):  # a run killed before its first summary
        macs = macs_at(row.runs[0], image_size, macs_cache) if image_size else None
    macs_224 = macs_at(row.runs[0], 224, macs_cache)
    epochs = s0.get("epochs", get_path(row.runs[0].config, "trainer.epochs"))
    done = [d for d in (r.summary.get("epochs_done", len(r.metrics)) for r in runs) if isinstance(d, int)]
    return {
        "model": row.model, "config": row.label, "status": row.status, "n": len(runs),
        "seeds": ",".join(str(r.seed) for r in runs),
        "data": row.recipe.get("data"), "epochs": epochs,
        "epochs_done": min(done) if done else None,
        "train_images": s0.get("train_images"),
        "params_m": s0["params"] / 1e6 if isinstance(s0.get("params"), int) else None,
        "image_size": image_size, "macs_m": macs / 1e6 if macs else None,
        "macs_224_m": macs_224 / 1e6 if macs_224 else None,
        "best_val_acc_mean": _pct(val[0]), "best_val_acc_std": _pct(val[1]),
        "test_acc_mean": _pct(test[0]), "test_acc_std": _pct(test[1]),
        "test_acc_tta_mean": _pct(test_tta[0]), "test_acc_tta_std": _pct(test_tta[1]),
        "train_min_mean": train_min[0], "images_per_s_mean": ips[0],
        "device": ", ".join(sorted({str(r.summary.get("device")) for r in runs if r.summary.get("device")})) or None,
        "int8_test_acc_mean": _pct(int8[0]), "int8_test_acc_std": _pct(int8[1]), "int8_drop_pts": _pct(drop[0]),
        "latency_ms_mean": latency[0], "int8_latency_ms_mean": int8_latency[0],
        "latency_batch": _joined(r.deploy.latency_batch for r in runs),
        "latency_backend": _joined(r.deploy.latency_backend for r in runs),
        "run_dirs": ";".join(shown_path(r.dir) for r in runs),
    }


def _joined(items: Iterable[Any]) -> str | None:
    distinct = sorted({str(i) for i in items if i is not None})
    return ",".join(distinct) or None


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction
