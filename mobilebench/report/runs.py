"""Finding run dirs and reading what they hold: summary, config, metrics and deployment reports."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilebench.errors import UserError

DEPLOY_FILES = ("quantize.json", "latency.json")
# Names in quantize.json / latency.json (mobilebench.deploy), first found wins; the flat keys below
# them are accepted too, so a report from an older or hand-made tool still fills the columns.
FP32_BACKENDS = ("onnx_fp32", "pytorch", "pytorch_fp32")
INT8_BACKENDS = ("onnx_int8", "pytorch_dynamic_int8")
INT8_ACC_KEYS = ("int8_test_acc", "int8_acc", "quantized_test_acc", "quantized_acc", "test_acc_int8", "acc_int8")
LATENCY_KEYS = ("latency_ms", "median_ms", "p50_ms", "mean_ms", "ms")
CHECKPOINT_KEYS = ("checkpoint", "source_checkpoint", "checkpoint_path", "fp32_checkpoint", "source")


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
        return str(self.summary.get("model") or get_path(self.config, "model.name") or "?")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", get_path(self.config, "trainer.seed"))



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
    import yaml  # PyYAML: installed with omegaconf, which reads the same files

    try:
        # Hydra stores the config unresolved: ${oc.env:...} reads as written, not as this shell's environment.
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, ValueError):
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


def get_path(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node



def shown_path(path: Path) -> str:
    """Relative to the working dir when below it, so a committed report names no home dirs."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
