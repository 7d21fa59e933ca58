"""ExecuTorch programs (`.pte`) for phones: torch.export -> XNNPACK delegate -> `.pte`, PT2E int8
with the XNNPACK quantizer, the runtime that runs them here, and the metadata they carry.

- Batch: dynamic, 1..`max_batch` (MAX_BATCH unless the caller asks for more). The runtime plans
  the input and output buffers for the upper bound, so a phone pays for it in memory at load
  time; `pte_runner` cuts a larger batch into pieces, so callers may pass any batch size.
- Lowering: two exact graph edits make a MobileNet delegate whole. Hard-sigmoid becomes
  hardtanh(x + 3, 0, 6) / 6 with float constants (the stock decomposition adds int constants that
  need a cast outside the delegate), and the flatten before the classifier reshapes to [-1, C]
  (XNNPACK refuses a reshape to a symbolic size but takes one inferred dimension).
- Metadata: the ONNX files' key/value strings (`deploy.onnx.source_metadata`) as JSON bytes,
  returned by a constant method `mobilebench_metadata` (a uint8 tensor) beside `forward`.
- Threads: the runtime's thread pool is process-wide (`_unsafe_reset_threadpool`), set before a
  program is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebench.deploy.common import quiet
from mobilebench.deploy.onnx import META_PREFIX, decode_metadata
from mobilebench.errors import UserError

INSTALL_HINT = "pip install 'mobilebench[mobile]'"
METADATA_METHOD = "mobilebench_metadata"
MAX_BATCH = 32  # default upper bound of the batch axis (export.batch_size-sized parity batches are cut into pieces)
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so the example batch is 2
BOOKKEEPING = ("executorch_call_delegate", "getitem", "sym_size")  # top-level nodes that are not compute


def _import(module: str) -> ModuleType:
    try:
        return import_module(module)
    except ImportError:  # a missing wheel, or one without its native runtime
        top = module.split(".")[0]
        raise UserError(f"{top} is not installed; install it with: {INSTALL_HINT}") from None


def require_executorch() -> None:
    """Fail with one line naming the `mobile` extra when ExecuTorch (or its native runtime) is missing."""
    _import("executorch")
    with native_stderr():  # the runtime logs CPU probing lines on first import
        _import("executorch.runtime")


def executorch_installed() -> bool:
    try:
        require_executorch()
    except UserError:
        return False
    return True


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture ExecuTorch's log lines; they land in the yielded list. The runtime writes them to fd 2,
    or through Python's sys.stderr when that is not the process's stderr (pytest's capture, say)."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to capture
        yield lines
        return
    text = io.StringIO()
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(text):
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            out = sink.read().decode(errors="replace") + text.getvalue()
            lines += [line.strip() for line in out.splitlines() if line.strip()]


# --- building programs ----------------------------------------------------------------------------------


def example_input(image_size: int) -> tuple[torch.Tensor]:
    return (torch.randn(EXAMPLE_BATCH, 3, image_size, image_size),)


def batch_shapes(max_batch: int = MAX_BATCH) -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def export_program(model: nn.Module, image_size: int, max_batch: int = MAX_BATCH) -> torch.export.ExportedProgram:
    """torch.export of `model` (eval mode) with a batch axis of 1..max_batch."""
    try:
        with quiet():
            return torch.export.export(model.eval(), example_input(image_size), dynamic_shapes=batch_shapes(max_batch))
    except Exception as err:  # torch.export raises many types; its first line says what went wrong
        raise UserError(f"torch.export failed: {str(err).strip().splitlines()[0]}") from None


def xnnpack_quantizer() -> Any:
    """The XNNPACK quantizer as export.int8 uses it: int8 symmetric, per-channel weights, per-tensor activations."""
    module = _import("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    return module.XNNPACKQuantizer().set_global(module.get_symmetric_quantization_config(is_per_channel=True))


def quantize_program(model: nn.Module, image_size: int, calibration: Iterable[torch.Tensor],
                     max_batch: int = MAX_BATCH) -> tuple[torch.export.ExportedProgram, int]:
    """PT2E post-training int8: prepare with the XNNPACK quantizer, calibrate, convert, export again.

    Returns the program (to give `lower_to_pte`) and the number of calibration images."""
    _import("torchao")
    pt2e = _import("torchao.quantization.pt2e.quantize_pt2e")
    quantizer = xnnpack_quantizer()
    graph = export_program(copy.deepcopy(model), image_size, max_batch).module()
    seen = 0
    with quiet():
        prepared = pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in calibration:
                for piece in torch.as_tensor(batch).split(max_batch):  # the exported module checks the batch bound
                    prepared(piece)
                    seen += len(piece)
        converted = pt2e.convert_pt2e(prepared)
        program = torch.export.export(converted, example_input(image_size), dynamic_shapes=batch_shapes(max_batch))
    return program, seen


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    aten = torch.ops.aten
    return aten.div.Tensor(aten.hardtanh.default(aten.add.Tensor(x, 3.0), 0.0, 6.0), 6.0)


def _xnnpack_friendly(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The two exact edits of the module docstring, so every node of a MobileNet is delegated."""
    aten = torch.ops.aten
    program = program.run_decompositions({aten.hardsigmoid.default: _hardsigmoid})
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == aten.view.default:
            shape = list(node.args[1])
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in shape:
                shape[symbolic[0]] = -1
                node.args = (node.args[0], shape, *node.args[2:])
    program.graph_module.recompile()
    return program


def _shape_env(program: torch.export.ExportedProgram) -> Any:
    for node in program.graph.nodes:
        val = node.meta.get("val")
        for dim in getattr(val, "shape", ()):
            if isinstance(dim, torch.SymInt):
                return dim.node.shape_env
    return None


def lower_to_pte(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
    """Lower to XNNPACK, save the .pte (with the metadata method when `metadata`), return a delegation report:
    {"delegated_nodes", "non_delegated_nodes", "non_delegated_ops", "delegates", "backends", "convs"
    (`int8_conv_share`), "bytes", "max_batch" (None for a program exported with a fixed batch)}."""
    path = Path(path)
    exir = _import("executorch.exir")
    partitioner = _import("executorch.backends.xnnpack.partition.xnnpack_partitioner").XnnpackPartitioner
    program = _xnnpack_friendly(program)
    env = _shape_env(program)
    ranges = dict(env.var_to_range) if env is not None else {}
    methods = {}
    if metadata:
        blob = json.dumps(metadata, sort_keys=True).encode()
        methods[METADATA_METHOD] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    try:
        with quiet(), native_stderr():
            edge = exir.to_edge_transform_and_lower(program, partitioner=[partitioner()], constant_methods=methods or None)
            # XNNPACK's layout pass re-traces every conv with fake tensors, and the fake conv's backend choice
            # guards "batch < 16" on the example batch, narrowing the batch range to 2..15. That guard is about
            # which PyTorch kernel eager mode would pick, not about the graph, so the exported range is put back
            # before memory planning sizes the input for it (checked: batches 1..max run exactly).
            if env is not None:
                env.var_to_range.update(ranges)
            report = delegation_report(edge.exported_program())
            buffer = edge.to_executorch().buffer
    except UserError:
        raise
    except Exception as err:  # exir raises many types; the first line says what went wrong
        raise UserError(f"lowering to ExecuTorch (XNNPACK) failed: {str(err).strip().splitlines()[0]}") from None
    from mobilebench.runfiles import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: f.write(buffer))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    uppers = [r.upper for r in ranges.values() if r.is_int and r.upper.is_finite]
    return {**report, "bytes": len(buffer), "max_batch": int(max(uppers)) if uppers else None}


# --- inspecting programs -------------------------------------------------------------------------------


def _op_name(node: torch.fx.Node) -> str:
    """aten.convolution.default for ATen and edge ops alike; getitem, executorch_call_delegate, ..."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        target = getattr(target, "_op", target)  # an edge op wraps its ATen OpOverload
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _delegates(program: Any) -> list[Any]:
    """The LoweredBackendModules a lowered program calls (none before lowering)."""
    module = getattr(program, "graph_module", program)
    return [child for _, child in module.named_children() if hasattr(child, "original_module")]


def _calls(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function"]


def delegation_report(program: Any) -> dict[str, Any]:
    """Nodes inside XNNPACK delegates vs left to ExecuTorch's portable kernels, plus `int8_conv_share`."""
    delegates = _delegates(program)
    inside = sum(len(_calls(d.original_module.graph)) for d in delegates)
    outside = Counter(_op_name(n) for n in _calls(program.graph) if not any(b in _op_name(n) for b in BOOKKEEPING))
    return {"delegated_nodes": inside, "non_delegated_nodes": sum(outside.values()),
            "non_delegated_ops": dict(outside), "delegates": len(delegates),
            "backends": sorted({d.backend_id for d in delegates}), "convs": int8_conv_share(program)}


def _is_int8_dequant(node: Any) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and "dequantize" in _op_name(node)
            and torch.int8 in node.args)


def int8_conv_share(program: Any) -> dict[str, Any]:
    """How many convolutions (and linears) run in int8, from the graph.

    A conv is int8 when its activation and its weight both arrive through an int8 `dequantize`
    (the Q/DQ pattern PT2E's convert leaves), and -- in a lowered program -- it sits inside an
    XNNPACK delegate, which fuses dequantize -> conv -> quantize into one int8 (QS8) kernel; a conv
    outside a delegate would run in float in the portable kernels. Works on a converted graph before
    lowering (GraphModule or ExportedProgram: there the Q/DQ pattern alone counts) and after.
    """
    delegates = _delegates(program)
    graph = program.graph
    graphs = [(d.original_module.graph, True) for d in delegates] + [(graph, not delegates)]
    counts = {"conv": {"int8": 0, "float": 0}, "linear": {"int8": 0, "float": 0}}
    for g, can_be_int8 in graphs:
        for node in _calls(g):
            name = _op_name(node)
            kind = "conv" if "convolution" in name or "conv2d" in name else "linear" if "linear" in name or "addmm" in name else None
            if kind is None:
                continue
            ins = [a for a in node.args[:3] if isinstance(a, torch.fx.Node)]
            quantized = can_be_int8 and len(ins) >= 2 and all(_is_int8_dequant(a) for a in ins[:2])
            counts[kind]["int8" if quantized else "float"] += 1
    total = counts["conv"]["int8"] + counts["conv"]["float"]
    where = "inside an XNNPACK delegate" if delegates else "(graph before lowering)"
    return {**counts, "int8_share": round(counts["conv"]["int8"] / total, 4) if total else None,
            "counted": f"convs whose input and weight come through int8 dequantize, {where}"}


# --- running programs ----------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """Size ExecuTorch's process-wide thread pool (XNNPACK runs on it); returns the count in use."""
    require_executorch()
    with native_stderr():
        lib = _import("executorch.extension.pybindings.portable_lib")
        if threads and lib._threadpool_get_thread_count() != threads:
            lib._unsafe_reset_threadpool(int(threads))  # "unsafe" only while a method runs; none does here
        return int(lib._threadpool_get_thread_count())


def load_program(path: Path) -> Any:
    """An `executorch.runtime.Program`, or one line saying why the file is not one."""
    require_executorch()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    runtime = _import("executorch.runtime")
    with native_stderr() as log:
        try:
            return runtime.Runtime.get().load_program(path)
        except Exception:  # RuntimeError("Failed to load program, error: 0x:23"); the reason is in the native log
            pass
    why = next((line.split("] ", 1)[-1] for line in log if "cpuinfo" not in line), "unreadable")
    raise UserError(f"{path} is not a readable ExecuTorch program ({why}); it may be truncated or another kind "
                    "of file; re-export it with: mobilebench export checkpoint=PATH format=executorch")


def read_pte_props(program_or_path: Any) -> dict[str, str]:
    """The raw mobilebench.* key/value strings a .pte carries ({} when it has none)."""
    program = load_program(program_or_path) if isinstance(program_or_path, (str, Path)) else program_or_path
    if METADATA_METHOD not in program.method_names:
        return {}
    try:
        with native_stderr():
            blob = program.load_method(METADATA_METHOD).execute([])[0]
        props = json.loads(bytes(np.asarray(blob, dtype=np.uint8)).decode())
    except Exception:  # a method of that name that is not ours
        return {}
    return {str(k): str(v) for k, v in props.items() if str(k).startswith(META_PREFIX)} if isinstance(props, dict) else {}


def read_pte_metadata(path: Path) -> dict[str, Any] | None:
    """The decoded metadata ({model, classes, mean, std, image_size, resize}); None if the .pte has none.
    UserError (one line) when the file is not an ExecuTorch program."""
    return decode_metadata(read_pte_props(path))


def pte_runner(path: Path, threads: int | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """Logits of the program's `forward` for a float NCHW batch of any size (cut into pieces of at most
    the program's batch bound)."""
    if threads:
        set_threads(threads)
    program = load_program(path)
    if "forward" not in program.method_names:
        raise UserError(f"{path} has no forward method; re-export it with: mobilebench export checkpoint=PATH format=executorch")
    with native_stderr() as log:
        try:
            method = program.load_method("forward")
            sizes = tuple(method.metadata.input_tensor_meta(0).sizes())
        except Exception:
            method = None
    if method is None:
        raise UserError(f"ExecuTorch cannot load {path}'s forward ({(log or ['unknown error'])[-1]})")
    bound, item_shape = int(sizes[0]), tuple(sizes[1:])
    fixed: list[bool] = []  # learnt on the first short piece: a program with a fixed batch gets it zero-padded

    def piece_logits(piece: torch.Tensor) -> torch.Tensor:
        if len(piece) < bound and not fixed:
            with native_stderr():
                try:
                    out = method.execute([piece.contiguous()])[0]
                    fixed.append(False)
                    return out
                except RuntimeError:  # "Attempted to resize a static tensor"
                    fixed.append(True)
        if len(piece) < bound and fixed[0]:
            padded = torch.cat([piece, piece.new_zeros(bound - len(piece), *item_shape)])
            return method.execute([padded])[0][: len(piece)]
        return method.execute([piece.contiguous()])[0]

    def run(x: torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(x, dtype=torch.float32)
        if tuple(x.shape[1:]) != item_shape:
            raise UserError(f"{path} takes inputs of shape [batch, {', '.join(map(str, item_shape))}], got {list(x.shape)}")
        outs = [piece_logits(piece) for piece in x.split(bound)]
        return torch.cat(outs).numpy() if len(outs) > 1 else outs[0].numpy()

    return run
