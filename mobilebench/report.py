"""`mobilebench report PATH...`: the comparison table and plots, built from finished runs.

Reads top to bottom: find run dirs (by their summary.json), load each run, attach any
quantize/latency reports that point at its checkpoints, group runs that differ only in seed,
aggregate, then write report.md, report.csv, curves.png and pareto.png and print the table.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mobilebench.errors import UserError

MODEL_ORDER = ("v1", "v2", "v3_small", "v3_large")
# Settings that change how fast or where a run goes, or where it writes, but not what it learns:
# runs that differ only in these (and the seed) are repeats of one configuration.
NOT_RECIPE = frozenset({
    "trainer.seed", "trainer.device", "trainer.precision", "trainer.compile", "trainer.threads",
    "trainer.progress", "trainer.log_every", "trainer.resume", "trainer.overwrite", "trainer.channels_last",
    "data.root", "data.download", "data.num_workers", "data.cache_dir", "data.device_resident",
    "command", "checkpoint",
})
NOT_RECIPE_SECTIONS = ("hydra", "summary", "bench", "export", "quantize", "prune")
DEPLOY_FILES = ("quantize.json", "latency.json")
# Names in quantize.json / latency.json (mobilebench.deploy), first found wins; the flat keys below
# them are accepted too, so a report from an older or hand-made tool still fills the columns.
FP32_BACKENDS = ("onnx_fp32", "pytorch", "pytorch_fp32")
INT8_BACKENDS = ("onnx_int8", "pytorch_dynamic_int8")
INT8_ACC_KEYS = ("int8_test_acc", "int8_acc", "quantized_test_acc", "quantized_acc", "test_acc_int8", "acc_int8")
LATENCY_KEYS = ("latency_ms", "median_ms", "p50_ms", "mean_ms", "ms")
CHECKPOINT_KEYS = ("checkpoint", "source_checkpoint", "checkpoint_path", "fp32_checkpoint", "source")
PLOTS_HINT = "plots skipped (matplotlib missing); get them with: pip install 'mobilebench[report]'"


@dataclass
class Deploy:
    """What quantize.json / latency.json reports say about one run's checkpoint."""

    int8_acc: float | None = None
    fp32_acc: float | None = None  # on the quantize report's own test images: the int8 drop is against this
    latency_ms: float | None = None  # median per batch, fp32
    int8_latency_ms: float | None = None
    latency_batch: int | None = None
    latency_backend: str | None = None
    sources: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One training run dir: its summary, config, per-epoch metrics and deployment numbers."""

    dir: Path
    status: str
    summary: dict[str, Any]
    config: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    deploy: Deploy = field(default_factory=Deploy)

    @property
    def model(self) -> str:
        return str(self.summary.get("model") or _get(self.config, "model.name") or "?")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", _get(self.config, "trainer.seed"))


@dataclass
class Row:
    """One line of the table: the runs of one configuration that share a status."""

    model: str
    label: str
    status: str
    runs: list[Run]
    recipe: dict[str, Any]


# --- finding and loading runs ------------------------------------------------------------


def find_run_dirs(paths: Sequence[str]) -> list[Path]:
    """Run dirs under each path: the path itself when it holds summary.json, else every dir below that does.

    A train job dir that has its Hydra config but no summary.json yet (still loading data, or it
    died before training began) is a run too, so it gets listed rather than dropped.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"{raw}: no such file or directory")
        if path.is_file():
            path = path.parent if path.name == "summary.json" else path
            if not (path / "summary.json").is_file():
                raise UserError(f"{raw} is not a run dir; pass run dirs or multirun dirs (they hold summary.json)")
        if (path / "summary.json").is_file():
            found[path.resolve()] = None
            continue
        for marker in sorted([*path.rglob("summary.json"), *path.rglob(".hydra/config.yaml")]):
            run_dir = marker.parent if marker.name == "summary.json" else marker.parent.parent
            if marker.name == "summary.json" or _is_train_config(marker):
                found[run_dir.resolve()] = None
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    """Sort multirun job dirs 2_, 10_ by number, not as text."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_train_config(path: Path) -> bool:
    config = _load_yaml(path)
    return isinstance(config, dict) and config.get("command", "train") == "train" and "trainer" in config


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        # Unresolved on purpose: ${oc.env:...} should read as written, not as this shell's environment.
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, OmegaConfBaseException, ValueError):
        return None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(run_dir: Path) -> Run | None:
    """Read one run dir; None when it is not a training run (another command's summary.json)."""
    config = _load_yaml(run_dir / ".hydra" / "config.yaml") if (run_dir / ".hydra" / "config.yaml").is_file() else None
    if isinstance(config, dict) and config.get("command", "train") != "train":
        return None
    summary_path = run_dir / "summary.json"
    summary = _load_json(summary_path) if summary_path.is_file() else None
    if summary_path.is_file() and not isinstance(summary, dict):
        status = "unreadable summary"
        summary = {}
    elif summary is None:
        status = "not started"  # dir made by Hydra, killed before training wrote its first summary
        summary = {}
    elif "status" not in summary or "model" not in summary:
        return None
    else:
        status = str(summary["status"])
    if not summary and config is None:
        return None
    return Run(dir=run_dir, status=status, summary=summary, config=config if isinstance(config, dict) else None,
               metrics=_read_metrics(run_dir / "metrics.jsonl"))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and not row.get("interrupted") and "epoch" in row:
            rows.append(row)
    return rows


# --- deployment reports ------------------------------------------------------------------


def attach_deploy_reports(runs: list[Run], search: Iterable[Path]) -> None:
    """Give each run the int8 accuracy and latency of reports whose checkpoint lies in its dir."""
    reports: dict[Path, None] = {}
    for root in search:
        root = root if root.is_dir() else root.parent
        for name in DEPLOY_FILES:
            for p in root.rglob(name):
                reports[p.resolve()] = None
    # latency.json first: the dedicated benchmark wins over the timings a quantize report carries.
    for report in sorted(reports, key=lambda p: (p.name != "latency.json", str(p))):
        blob = _load_json(report)
        if not isinstance(blob, dict):
            continue
        run = _owner(runs, _checkpoint_paths(blob))
        if run is None:
            continue
        numbers = quantize_numbers(blob) if report.name == "quantize.json" else latency_numbers(blob.get("results"))
        if report.name == "latency.json" and not numbers and _first_number(blob, LATENCY_KEYS) is not None:
            numbers = {"latency_ms": _first_number(blob, LATENCY_KEYS)}
        filled = False
        for key, value in numbers.items():
            if value is not None and getattr(run.deploy, key) is None:
                setattr(run.deploy, key, value)
                filled = True
        if filled:
            run.deploy.sources.append(str(report))


def quantize_numbers(blob: dict[str, Any]) -> dict[str, Any]:
    """int8 accuracy, the fp32 accuracy on the same images, and any timings, from a quantize.json."""
    out: dict[str, Any] = {}
    acc = blob.get("accuracy")
    if isinstance(acc, dict):
        int8_key = next((k for k in INT8_BACKENDS if _number(acc.get(k)) is not None), None)
        if int8_key is not None:
            ref_key = "onnx_fp32" if int8_key.startswith("onnx") else "pytorch_fp32"
            out["int8_acc"], out["fp32_acc"] = _fraction(acc[int8_key]), _fraction(_number(acc.get(ref_key)))
    if out.get("int8_acc") is None:
        out["int8_acc"] = _fraction(_int8_accuracy(blob))
    out.update(latency_numbers(blob.get("latency")))
    return out


def latency_numbers(section: Any) -> dict[str, Any]:
    """Median ms at the smallest batch timed, fp32 and int8, from {backend: {batch: {median_ms}}}
    (bench latency) or {batch: {backend: {median_ms}}} (quantize)."""
    points = []
    for outer, inner in (section.items() if isinstance(section, dict) else ()):
        for key, summary in (inner.items() if isinstance(inner, dict) else ()):
            ms = _number(summary.get("median_ms")) if isinstance(summary, dict) else None
            batch, backend = (outer, key) if str(outer).isdigit() else (key, outer)
            if ms is not None and str(batch).isdigit():
                points.append((int(batch), str(backend), ms))
    if not points:
        return {}
    batch = min(b for b, _, _ in points)
    at = {backend: ms for b, backend, ms in points if b == batch}
    fp32 = next((b for b in FP32_BACKENDS if b in at), None)
    int8 = next((b for b in INT8_BACKENDS if b in at), None)
    return {"latency_ms": at.get(fp32), "int8_latency_ms": at.get(int8), "latency_batch": batch,
            "latency_backend": fp32}


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _fraction(acc: float | None) -> float | None:
    return acc / 100.0 if acc is not None and 1.0 < acc <= 100.0 else acc  # the runs store fractions


def _checkpoint_paths(blob: Any) -> list[Path]:
    """Every path-like value under a checkpoint-ish key, at any depth."""
    out: list[Path] = []
    if isinstance(blob, dict):
        for key, value in blob.items():
            if isinstance(value, str) and (key in CHECKPOINT_KEYS or value.endswith((".pt", ".pth"))):
                p = Path(value).expanduser()
                out.append(p if p.is_absolute() else Path.cwd() / p)  # commands run with Hydra's chdir off
            elif isinstance(value, (dict, list)):
                out.extend(_checkpoint_paths(value))
    elif isinstance(blob, list):
        for item in blob:
            out.extend(_checkpoint_paths(item))
    return out


def _owner(runs: list[Run], paths: list[Path]) -> Run | None:
    for p in paths:
        try:
            resolved = p.resolve()
        except OSError:
            continue
        for run in runs:
            if run.dir in resolved.parents:
                return run
    return None


def _first_number(blob: Any, keys: Sequence[str]) -> float | None:
    """The value of the first of `keys` found, this level before nested ones, as a float."""
    children: list[Any] = list(blob.values()) if isinstance(blob, dict) else blob if isinstance(blob, list) else []
    if isinstance(blob, dict):
        for key in keys:
            if _number(blob.get(key)) is not None:
                return _number(blob[key])
    for child in children:
        found = _first_number(child, keys) if isinstance(child, (dict, list)) else None
        if found is not None:
            return found
    return None


def _int8_accuracy(blob: dict[str, Any]) -> float | None:
    """An explicit int8 key, else the plain accuracy inside an "int8"/"quantized" section."""
    found = _first_number(blob, INT8_ACC_KEYS)
    for section in ("int8", "quantized"):
        if found is None and isinstance(blob.get(section), dict):
            found = _first_number(blob[section], ("test_acc", "acc", "accuracy"))
    return found


# --- grouping ----------------------------------------------------------------------------


def _get(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


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
    name = _get(run.config, "data.name") or run.summary.get("data") or "?"
    if name == "imagefolder":
        root = _get(run.config, "data.root")
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
    rank = MODEL_ORDER.index(row.model) if row.model in MODEL_ORDER else len(MODEL_ORDER)
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
    name = run.summary.get("model") or _get(run.config, "model.name")
    if not name:
        return None
    args: dict[str, Any] = {"name": name, "num_classes": _num_classes(run),
                            "width_mult": run.summary.get("width_mult", _get(run.config, "model.width_mult") or 1.0),
                            "stem": run.summary.get("stem", _get(run.config, "model.stem") or "cifar")}
    hidden = _get(run.config, "model.hidden_channels")
    if hidden:
        args["hidden_channels"] = list(hidden)
    return args


def _num_classes(run: Run) -> int:
    for key in ("model.num_classes", "data.num_classes"):
        value = _get(run.config, key)
        if isinstance(value, int):
            return value
    return 100 if dataset_id(run) == "cifar100" else 10


def row_values(row: Row, macs_cache: dict[str, int | None]) -> dict[str, Any]:
    """The numbers of one row; accuracies in percent, time in minutes, None where unknown."""
    runs, s0 = row.runs, row.runs[0].summary
    image_size = s0.get("image_size") or _get(row.runs[0].config, "data.image_size")
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
    epochs = s0.get("epochs", _get(row.runs[0].config, "trainer.epochs"))
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
        "run_dirs": ";".join(_shown_path(r.dir) for r in runs),
    }


def _joined(items: Iterable[Any]) -> str | None:
    distinct = sorted({str(i) for i in items if i is not None})
    return ",".join(distinct) or None


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _shown_path(path: Path) -> str:
    """Relative to the working dir when below it, so a committed report names no home dirs."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- output ------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "config", "status", "n", "seeds", "data", "epochs", "epochs_done", "train_images", "params_m",
               "image_size", "macs_m", "macs_224_m", "best_val_acc_mean", "best_val_acc_std", "test_acc_mean",
               "test_acc_std", "test_acc_tta_mean", "test_acc_tta_std", "train_min_mean", "images_per_s_mean", "device", "int8_test_acc_mean",
               "int8_test_acc_std", "int8_drop_pts", "latency_ms_mean", "int8_latency_ms_mean", "latency_batch",
               "latency_backend", "run_dirs")


LEFT_COLUMNS = ("model", "config", "status", "device")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _status_text(v: dict[str, Any]) -> str:
    if v["status"] == "completed":
        return "completed"
    done = v["epochs_done"]
    return f"{v['status']} ({done}/{v['epochs']} epochs)" if done is not None and v["epochs"] else v["status"]


def display_table(values: list[dict[str, Any]], image_size: Any) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by report.md and the terminal; optional columns only when filled."""
    res = f"{image_size}px" if image_size else "train res"
    cols: list[tuple[str, Any]] = [("model", lambda v: v["model"])]
    if any(v["config"] for v in values):
        cols.append(("config", lambda v: v["config"] or "—"))
    cols += [
        ("status", _status_text),
        ("n", lambda v: str(v["n"])),
        ("params (M)", lambda v: _fmt(v["params_m"])),
        (f"MACs (M) @{res}", lambda v: _fmt(v["macs_m"], 1)),
        ("MACs (M) @224px, same net", lambda v: _fmt(v["macs_224_m"], 0)),
        ("best val acc (%)", lambda v: _pm(v["best_val_acc_mean"], v["best_val_acc_std"])),
        ("test acc (%)", lambda v: _pm(v["test_acc_mean"], v["test_acc_std"])),
    ]
    if any(v["test_acc_tta_mean"] is not None for v in values):
        cols.append(("test acc, flip TTA (%)", lambda v: _pm(v["test_acc_tta_mean"], v["test_acc_tta_std"])))
    cols += [
        ("train time (min)", lambda v: _fmt(v["train_min_mean"], 1)),
        ("images/s", lambda v: _fmt(v["images_per_s_mean"], 0)),
        ("device", lambda v: v["device"] or "—"),
    ]
    if any(v["int8_test_acc_mean"] is not None for v in values):
        cols.append(("int8 acc (%)", lambda v: _pm(v["int8_test_acc_mean"], v["int8_test_acc_std"])))
    if any(v["int8_drop_pts"] is not None for v in values):
        cols.append(("int8 drop (pts)", lambda v: _fmt(v["int8_drop_pts"], 2)))
    if any(v["latency_ms_mean"] is not None for v in values):
        cols.append(("latency fp32 (ms)", lambda v: _fmt(v["latency_ms_mean"], 2)))
    if any(v["int8_latency_ms_mean"] is not None for v in values):
        cols.append(("latency int8 (ms)", lambda v: _fmt(v["int8_latency_ms_mean"], 2)))
    return [c for c, _ in cols], [[f(v) for _, f in cols] for v in values]


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def line(items: list[str]) -> str:
        return "| " + " | ".join(i.replace("|", "\\|") for i in items) + " |"

    align = ["---" if h in LEFT_COLUMNS else "---:" for h in header]
    return "\n".join([line(header), "| " + " | ".join(align) + " |", *(line(c) for c in cells)]) + "\n"


def write_csv(values: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for v in values:
        writer.writerow({k: ("" if v.get(k) is None else round(v[k], 4) if isinstance(v[k], float) else v[k])
                         for k in CSV_COLUMNS})
    path.write_text(buf.getvalue())


def shared_settings(runs: list[Run]) -> list[str]:
    """Facts every run agrees on, stated once above the table (data, subset, epochs, software)."""
    facts = []
    for label, get in (("data", dataset_id), ("train / val / test images", _split_sizes),
                       ("epochs", lambda r: r.summary.get("epochs", _get(r.config, "trainer.epochs"))),
                       ("batch", lambda r: r.summary.get("global_batch_size")),
                       ("precision", lambda r: r.summary.get("precision")),
                       ("threads", lambda r: r.summary.get("threads")),
                       ("torch", lambda r: r.summary.get("torch"))):
        seen = {str(get(r)) for r in runs if get(r) is not None}
        if len(seen) == 1:
            facts.append(f"{label}: {seen.pop()}")
    return facts


def _split_sizes(run: Run) -> str | None:
    s = run.summary
    if s.get("train_images") is None:
        return None
    return f"{s['train_images']} / {s.get('val_images')} / {s.get('test_images')}"


def markdown_report(header: list[str], cells: list[list[str]], runs: list[Run], values: list[dict[str, Any]],
                    plots: list[str], command: str) -> str:
    lines = ["# MobileNet comparison", "",
             f"Generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `{command}` from {_plural(len(runs), 'run')}.", ""]
    facts = shared_settings(runs)
    if facts:
        lines += ["Shared by every run: " + "; ".join(facts) + ".", ""]
    lines += [markdown_table(header, cells),
              "Accuracies are mean ± sample std over the n runs of a row (seeds listed in report.csv). "
              "Best val acc uses the EMA weights when the run kept an EMA; test acc is the best-val checkpoint on the test split. "
              "MACs @224px is the same network (same stem and width) on a 224x224 input, not the ImageNet-stem model. "
              "Train time excludes evaluation; images/s is training throughput.", ""]
    unfinished = [v for v in values if v["status"] != "completed"]
    if unfinished:
        lines += [f"{len(unfinished)} run(s) did not complete and are listed with their status; their accuracies are "
                  "the best validation so far and count in no mean.", ""]
    if any(r.deploy.sources for r in runs):
        lines += ["int8 accuracy (and its drop against fp32 on the same images) and latency (median per batch at "
                  "the smallest batch timed, see report.csv) come from: "
                  + ", ".join(f"`{_shown_path(Path(s))}`" for r in runs for s in r.deploy.sources) + ".", ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def print_table(header: list[str], cells: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in LEFT_COLUMNS else "right")
    for c in cells:
        table.add_row(*c)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped into a file or a log, rich would squeeze the table into 80 columns
    console.print(table)


# --- plots -------------------------------------------------------------------------------


def _series_label(row: Row) -> str:
    status = "" if row.status == "completed" else f" ({row.status})"
    return f"{row.model} {row.label}".strip() + status


def plot_curves(rows: list[Row], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = [_series_label(row) for row in rows]
    # One legend under both plots: long config labels inside an axes would squeeze it to nothing.
    ncols = 1 if max(map(len, labels)) > 45 else min(4, len(labels))
    legend_rows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(10, 3.6 + 0.2 * legend_rows), dpi=100, layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    colors = _colors(len(rows))
    for row, color, row_label in zip(rows, colors, labels):
        for i, run in enumerate(row.runs):
            epochs = [m["epoch"] for m in run.metrics]
            label = row_label if i == 0 else None
            style = "-" if row.status == "completed" else ":"
            acc = [100 * m["val_acc"] if isinstance(m.get("val_acc"), (int, float)) else math.nan for m in run.metrics]
            ax_acc.plot(epochs, acc, style, color=color, marker="o", markersize=3, label=label, alpha=0.85)
            ax_loss.plot(epochs, [m.get("train_loss", math.nan) for m in run.metrics], style, color=color,
                         marker="o", markersize=3, alpha=0.85)
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", title="validation accuracy (one line per run)")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")


def plot_pareto(values: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    colors = _colors(len(values))  # same colour per row as in curves.png
    done = [(v, c) for v, c in zip(values, colors) if v["status"] == "completed" and v["test_acc_mean"] is not None]
    panels = [("macs_m", "MACs (M) at training resolution")]
    if any(v["latency_ms_mean"] is not None for v, _ in done):
        panels.append(("latency_ms_mean", "latency fp32 (ms)"))
    # Points carry their model name; config settings, when rows differ in them, go to a legend below.
    with_config = any(v["config"] for v, _ in done)
    width = max(5.5 * len(panels), 10 if with_config else 0)
    fig = Figure(figsize=(width, 4.2 + (0.2 * len(done) if with_config else 0)), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    for ax, (key, xlabel) in zip(axes, panels):
        points = sorted((p for p in done if p[0][key] is not None), key=lambda p: p[0][key])
        for i, (v, color) in enumerate(points):
            n = f" (n={v['n']})" if v["n"] > 1 else ""
            ax.errorbar(v[key], v["test_acc_mean"], yerr=v["test_acc_std"] or 0, fmt="o", color=color, capsize=3,
                        label=f"{v['model']}{n} {v['config']}" if ax is axes[0] else None)
            # Neighbours on the x axis alternate above and below so their labels do not overprint;
            # the rightmost label goes left of its point so it stays inside the figure.
            last = i == len(points) - 1 and i > 0
            ax.annotate(v["model"] + ("" if with_config else n), (v[key], v["test_acc_mean"]), textcoords="offset points",
                        xytext=(-4 if last else 4, 5 if i % 2 == 0 else -5), ha="right" if last else "left",
                        va="bottom" if i % 2 == 0 else "top", fontsize=8, color=color)
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"test accuracy vs {xlabel.split(' (')[0]}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.25, y=0.15)
    if with_config:
        fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")  # a legend wider than the figure still fits


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_plots(rows: list[Row], values: list[dict[str, Any]], out: Path) -> list[str]:
    """curves.png and pareto.png; [] (and a one-line note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.stderr.write(f"mobilebench: {PLOTS_HINT}\n")
        return []
    plot_curves(rows, out / "curves.png")
    plot_pareto(values, out / "pareto.png")
    return ["curves.png", "pareto.png"]


# --- entry point -------------------------------------------------------------------------


def build_report(paths: Sequence[str], out: Path | None, allow_mixed_data: bool = False,
                 command: str = "mobilebench report", echo: bool = True) -> Path:
    run_dirs = find_run_dirs(paths)
    runs = [r for r in (load_run(d) for d in run_dirs) if r is not None]
    if not runs:
        raise UserError(f"no training runs found under {', '.join(paths)} (a run dir holds summary.json)")
    check_data(runs, allow_mixed_data)
    attach_deploy_reports(runs, [Path(p).expanduser() for p in paths])
    rows = group_runs(runs)
    macs_cache: dict[str, int | None] = {}
    values = [row_values(row, macs_cache) for row in rows]
    sizes = {v["image_size"] for v in values if v["image_size"]}
    header, cells = display_table(values, sizes.pop() if len(sizes) == 1 else None)

    out = out or Path("reports") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(values, out / "report.csv")
        plots = write_plots(rows, values, out)
        (out / "report.md").write_text(markdown_report(header, cells, runs, values, plots, command))
    except OSError as err:
        raise UserError(f"cannot write the report to {out}: {err.strerror or err}") from None
    if echo:
        print_table(header, cells, title=f"MobileNet comparison ({_plural(len(runs), 'run')}) -> {out}")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line like every other mobilebench mistake, not argparse's usage block.
        raise UserError(f"{message} (see mobilebench report --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="mobilebench report",
        description="Build the comparison table (report.md, report.csv) and plots (curves.png, pareto.png) "
                    "from training run dirs or multirun dirs.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run dirs or dirs holding them (searched recursively); add the output dirs of "
                             "`mobilebench quantize` / `bench latency` to fill the int8 and latency columns")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: a new dir under reports/)")
    parser.add_argument("--allow-mixed-data", action="store_true",
                        help="put runs on different data sets in one table instead of refusing")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        build_report(args.paths, args.out, args.allow_mixed_data,
                     command=" ".join(["mobilebench report", *argv]))
    except UserError as err:
        sys.stderr.write(f"mobilebench: error: {err}\n")
        return 2
    return 0
