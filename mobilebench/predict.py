"""`mobilebench predict`: classify image files with a checkpoint, an exported ONNX model or an
ExecuTorch program.

Images go through the training data's own decode (`data.decode_image`) and eval's own
normalisation and resize (`loader.eval_batches`), so the class predicted for an image is the one
`mobilebench eval` scores for it. An ONNX model from `mobilebench export` / `quantize` and a `.pte`
from `mobilebench export format=executorch` carry their class names and preprocessing
(`deploy.onnx.source_metadata`; a `.pte` returns them from a constant method), so they run alone.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilebench.checkpoint import EXPORTED, CheckpointError, load_model_and_checkpoint, resolve_checkpoint
from mobilebench.config import Config
from mobilebench.data import DataError, Split, decode_image
from mobilebench.deploy.common import need_checkpoint
from mobilebench.errors import UserError
from mobilebench.loader import eval_batches
from mobilebench.runfiles import write_json_atomic
from mobilebench.runtime import PRECISION_DTYPES, resolve_device, resolve_precision, set_threads
from mobilebench.validate import validate_predict

USAGE = "mobilebench predict checkpoint=outputs/train/.../checkpoints/best.pt inputs=photos/"
TAKES = ("predict takes a training checkpoint (a .pt file or its run dir), an ONNX model written by "
         "mobilebench export / quantize (.onnx) or an ExecuTorch program written by mobilebench export (.pte)")
REEXPORT = "re-export it with: mobilebench export checkpoint=RUN_DIR/checkpoints/best.pt format=onnx"
REEXPORT_PTE = "re-export it with: mobilebench export checkpoint=RUN_DIR/checkpoints/best.pt format=executorch"


@dataclass
class Predictor:
    """A model ready to score normalised batches, plus what its images must look like."""

    backend: str  # pytorch | onnxruntime | executorch
    checkpoint: str
    model: str
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int  # decoded to this size, as the training data was
    resize: int | None  # then resized on the normalised batch, as eval does (augment.resize)
    device: torch.device
    channels_last: bool
    logits: Callable[[torch.Tensor], torch.Tensor]

    def preprocess(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "resize": self.resize, "mean": self.mean, "std": self.std}


@dataclass
class Prediction:
    path: str
    topk: list[tuple[str, float]]  # (class, probability), most probable first

    def record(self) -> dict[str, Any]:
        top1, prob = self.topk[0]
        return {"path": self.path, "top1": top1, "top1_prob": prob,
                "topk": [{"class": name, "prob": p} for name, p in self.topk]}


def run_predict(config: Config, run_dir: Path) -> int:
    """Predict every input image, print a table, write predictions.csv/json; returns how many failed."""
    cfg = config.predict
    validate_predict(cfg)  # the CLI checked it already; a direct caller gets the same one-line errors
    checkpoint = need_checkpoint(config, f"{USAGE} (a .pt, its run dir, or an exported .onnx / .pte)")
    paths = collect_inputs(config.inputs)  # before loading the model: a mistyped path fails at once
    threads = set_threads(cfg.threads or config.trainer.threads)
    predictor = open_predictor(checkpoint, config, threads)
    k = min(cfg.top_k, len(predictor.classes))
    predictions, failures = predict_paths(predictor, paths, cfg.batch_size, k)
    report = {"checkpoint": predictor.checkpoint, "backend": predictor.backend, "model": predictor.model,
              "classes": predictor.classes, "top_k": k, "preprocess": predictor.preprocess(),
              "device": str(predictor.device), "threads": threads, "images": len(paths),
              "predicted": len(predictions), "failed": len(failures),
              "predictions": [p.record() for p in predictions], "failures": failures}
    files = write_predictions(run_dir, report, k)
    print_predictions(report, cfg.table_rows, files)
    return len(failures)


# --- inputs ------------------------------------------------------------------------------------


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what imagefolder training data accepts

    return tuple(IMG_EXTENSIONS)


def folder_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; other files are skipped by name."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):  # followlinks, as torchvision's make_dataset
        dirs.sort()
        found += [Path(root) / name for name in sorted(files) if name.lower().endswith(extensions)]
    return found


def collect_inputs(inputs: list[str] | None) -> list[Path]:
    """The image files `inputs=` names: files as given (always tried), folders searched recursively."""
    if not inputs:
        raise UserError(f"predict needs inputs=: an image, a folder or a list [a.png,dir/], e.g. {USAGE}")
    extensions = image_extensions()
    paths: list[Path] = []
    for entry in inputs:
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            found = folder_images(path, extensions)
            if not found:
                raise UserError(f"input folder {path} holds no images (looked for {', '.join(extensions)} "
                                "files, subfolders included)")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"input {path} does not exist; inputs= takes image files and folders")
    seen: set[Path] = set()
    unique = []
    for path in paths:  # a file named twice (directly and via its folder) is predicted once
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


# --- models ------------------------------------------------------------------------------------


def open_predictor(checkpoint: str, config: Config, threads: int) -> Predictor:
    """The backend the file calls for: a .pt or run dir runs in PyTorch, a .onnx in onnxruntime, a .pte in ExecuTorch."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; {TAKES}")
    if path.is_dir() or path.suffix == ".pt":
        return torch_predictor(path, config)
    if path.suffix == ".onnx":
        return onnx_predictor(path, threads)
    if path.suffix == ".pte":
        return pte_predictor(path, threads)
    what = EXPORTED.get(path.suffix, f"a {path.suffix} file" if path.suffix else "a file without a suffix")
    raise UserError(f"checkpoint {path} is {what}; {TAKES}")


def looks_like_onnx(path: Path) -> bool:
    """True when `path` parses as an ONNX graph (used only to explain a failed checkpoint load)."""
    try:
        import onnx

        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # not installed, or not ONNX: either way, not something to suggest
        return False


def torch_predictor(path: Path, config: Config) -> Predictor:
    """The checkpoint's plain model (EMA weights when kept), run as eval runs it."""
    from mobilebench.engine import autocast

    device = resolve_device(config.trainer.device)
    resolved = resolve_checkpoint(path)
    try:
        model, blob = load_model_and_checkpoint(resolved, device)
    except CheckpointError:
        if resolved.is_file() and not zipfile.is_zipfile(resolved):
            for suffix, what, test in ((".pte", "an ExecuTorch program", looks_like_pte), (".onnx", "an ONNX model", looks_like_onnx)):
                if test(resolved):
                    raise UserError(f"{resolved} is {what}, not a training checkpoint; rename it to "
                                    f"{resolved.with_suffix(suffix).name} and pass that") from None
        raise
    stats = blob.get("data") or {}
    if not stats.get("classes") or stats.get("mean") is None or stats.get("std") is None:
        raise CheckpointError(f"checkpoint {resolved} stores no class names or normalisation (blob['data']); "
                              "retrain or re-save it with this mobilebench")
    channels_last = config.trainer.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = PRECISION_DTYPES[resolve_precision(config.trainer.precision, device)]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, amp_dtype):
            return model(x).float()

    resize = ((blob.get("config") or {}).get("augment") or {}).get("resize")
    size = int(stats.get("image_size") or 32)
    return Predictor("pytorch", str(resolved), blob["model_args"]["name"], list(stats["classes"]), list(stats["mean"]),
                     list(stats["std"]), size, resize, device, channels_last, run)


def onnx_predictor(path: Path, threads: int) -> Predictor:
    """An onnxruntime CPU session, preprocessing as the model's metadata says."""
    from mobilebench.deploy.onnx import ort_run, ort_session, session_metadata

    refuse_zip(path, "an ONNX model", "onnx")  # torch.save writes zip archives; ONNX is a bare protobuf
    session = ort_session(path, threads)
    meta = need_metadata(session_metadata(session), path, REEXPORT)
    side = meta["resize"] or meta["image_size"]
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, side, side))):
        raise UserError(f"{path} takes input of shape {shape}, but its metadata says 3 x {side} x {side} images; {REEXPORT}")

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(ort_run(session, x))

    return exported_predictor("onnxruntime", path, meta, run)


def refuse_zip(path: Path, what: str, fmt: str) -> None:
    if zipfile.is_zipfile(path):
        raise UserError(f"{path} is a PyTorch file (a zip archive), not {what}; pass it as a .pt checkpoint, "
                        f"or export it with: mobilebench export checkpoint={path.with_suffix('.pt')} format={fmt}")


def need_metadata(meta: dict[str, Any] | None, path: Path, reexport: str) -> dict[str, Any]:
    if meta is None:
        raise UserError(f"{path} has no mobilebench metadata (class names, preprocessing), so predict cannot "
                        f"know its classes or input; {reexport}")
    return meta


def exported_predictor(backend: str, path: Path, meta: dict[str, Any],
                       run: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    """An exported model on the CPU, its classes and preprocessing as its metadata says."""
    return Predictor(backend, str(path), str(meta["model"]), meta["classes"], meta["mean"], meta["std"],
                     meta["image_size"], meta["resize"], torch.device("cpu"), False, run)


def looks_like_pte(path: Path) -> bool:
    """True when `path` starts like an ExecuTorch program (flatbuffer identifier "ET" at bytes 4..6)."""
    with open(path, "rb") as f:
        return f.read(8)[4:6] == b"ET"


def pte_predictor(path: Path, threads: int) -> Predictor:
    """An ExecuTorch program run by executorch.runtime (XNNPACK), preprocessing as its metadata says."""
    from mobilebench.deploy.executorch import pte_runner, read_pte_metadata, require_executorch

    require_executorch()
    refuse_zip(path, "an ExecuTorch program", "executorch")
    meta = need_metadata(read_pte_metadata(path), path, REEXPORT_PTE)  # one line when the file is not a program
    run_pte = pte_runner(path, threads)
    side = meta["resize"] or meta["image_size"]

    def run(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (3, side, side):
            raise UserError(f"{path}'s metadata says 3 x {side} x {side} images but got {tuple(x.shape[1:])}; {REEXPORT_PTE}")
        return torch.from_numpy(run_pte(x))

    return exported_predictor("executorch", path, meta, run)


# --- prediction --------------------------------------------------------------------------------


def chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def decode_or_reason(path: Path, size: int) -> torch.Tensor | str:
    try:
        return decode_image(str(path), size)
    except DataError as err:
        return str(err)


def predict_paths(predictor: Predictor, paths: list[Path], batch_size: int,
                  k: int) -> tuple[list[Prediction], list[dict[str, str]]]:
    """Top-k of every readable image; each unreadable one is one stderr line and a failure record.

    Images are decoded a batch at a time, so a large folder never sits in memory whole.
    """
    predictions: list[Prediction] = []
    failures: list[dict[str, str]] = []
    # PIL releases the GIL while decoding, so threads overlap without worker processes.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for chunk in chunks(paths, batch_size):
            good: list[tuple[Path, torch.Tensor]] = []
            for path, decoded in zip(chunk, pool.map(lambda p: decode_or_reason(p, predictor.image_size), chunk)):
                if isinstance(decoded, str):
                    sys.stderr.write(f"mobilebench: error: {decoded}\n")
                    failures.append({"path": str(path), "error": decoded})
                else:
                    good.append((path, decoded))
            if good:
                predictions += predict_batch(predictor, good, k)
    return predictions, failures


def predict_batch(predictor: Predictor, images: list[tuple[Path, torch.Tensor]], k: int) -> list[Prediction]:
    split = Split(torch.stack([x for _, x in images]), torch.zeros(len(images), dtype=torch.int64))
    batches = eval_batches(split, len(split), predictor.mean, predictor.std, predictor.device,
                           predictor.channels_last, predictor.resize)
    logits = torch.cat([predictor.logits(x).cpu() for x, _ in batches])
    if logits.ndim != 2 or logits.shape[1] != len(predictor.classes):
        raise UserError(f"{predictor.checkpoint} returned outputs of shape {tuple(logits.shape)} but names "
                        f"{len(predictor.classes)} classes; {REEXPORT}")
    # float64 softmax: the listed probabilities stay sorted and sum to at most 1 after rounding.
    probs, idx = torch.softmax(logits.double(), dim=1).topk(k, dim=1)
    return [Prediction(str(path), [(predictor.classes[j], round(p, 6)) for j, p in zip(row_idx.tolist(), row_p.tolist())])
            for (path, _), row_idx, row_p in zip(images, idx, probs)]


# --- output ------------------------------------------------------------------------------------


def csv_text(predictions: list[dict[str, Any]], k: int) -> str:
    """One row per predicted image: path, top1, top1_prob, top2, top2_prob, ... up to top{k}."""
    columns = ["path"] + [name for rank in range(1, k + 1) for name in (f"top{rank}", f"top{rank}_prob")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in predictions:
        writer.writerow([record["path"], *[v for item in record["topk"] for v in (item["class"], item["prob"])]])
    return out.getvalue()


def write_predictions(run_dir: Path, report: dict[str, Any], k: int) -> tuple[Path, Path]:
    """predictions.csv and predictions.json, each replaced whole (never half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = run_dir / "predictions.csv", run_dir / "predictions.json"
    write_json_atomic(csv_path, None, text=csv_text(report["predictions"], k))
    write_json_atomic(json_path, report)
    return csv_path, json_path


def print_predictions(report: dict[str, Any], rows: int, files: tuple[Path, Path]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    shown = report["predictions"][:rows]
    if shown:
        k = report["top_k"]
        # Paths relative to the folder they share keep the image column narrow enough to read.
        common = os.path.commonpath([os.path.dirname(os.path.abspath(r["path"])) for r in report["predictions"]])
        table = Table(title=f"{escape(report['model'])} ({report['backend']}): top-{k} of {report['predicted']} "
                            f"images in {escape(common)}")
        table.add_column("image", overflow="fold")
        table.add_column("top-1")
        table.add_column("prob", justify="right")
        if k > 1:
            table.add_column(f"next {k - 1}")
        for record in shown:
            rest = [", ".join(f"{escape(t['class'])} {t['prob']:.3f}" for t in record["topk"][1:])] if k > 1 else []
            table.add_row(escape(os.path.relpath(os.path.abspath(record["path"]), common)), escape(record["top1"]), f"{record['top1_prob']:.3f}", *rest)
        console.print(table)
    hidden = report["predicted"] - len(shown)
    if hidden > 0:
        console.print(f"{hidden} more image(s) not shown (predict.table_rows={rows}); all are in the files below")
    failed = f", {report['failed']} unreadable (named on stderr)" if report["failed"] else ""
    console.print(f"predicted {report['predicted']} of {report['images']} images{failed}; "
                  f"wrote {escape(str(files[0]))} and {escape(str(files[1]))}")
