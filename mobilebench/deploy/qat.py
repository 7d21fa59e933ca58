"""Quantization-aware training with torchao's PT2E flow, ending in an int8 graph ready for ExecuTorch.

The flow (`mobilebench quantize method=qat`):

1. `torch.export.export(model.train(), (x,), dynamic_shapes=...)` -- the training graph, dynamic batch;
2. `prepare_qat_pt2e(graph, qat_quantizer())` -- XNNPACK's symmetric config with `is_qat=True`:
   fake-quantize modules (FusedMovingAvgObsFakeQuantize: int8 per-tensor activations, int8
   per-channel weights) and every conv -> BatchNorm pair rewritten to the fused QAT pattern
   (the weight is scaled by gamma / running std before its fake-quantizer, so the int8 weight
   trained is the BN-folded one);
3. a short SGD fine-tune on cropped + flipped training batches, its target by default the fp32
   model's own logits (`qat_distill`: the weight of KL(fp32 || QAT), the rest cross-entropy on the
   labels), so the fine-tune learns to undo quantization error rather than to move the trained
   network towards a new optimum at an lr it was never annealed to; after `qat_freeze_observers` of
   the steps the quantization ranges stop moving (`disable_observer` on every fake-quantizer),
   after `qat_freeze_bn` the BatchNorms normalise with, and stop updating, their running
   statistics (the `training` flag of each batch_norm node set to False, as PyTorch's PT2E QAT
   tutorial does; torchao has no freeze_bn_stats for exported graphs);
4. `move_exported_model_to_eval`, `convert_pt2e` (BN folded into the int8 convs, quantize /
   dequantize pairs), then `torch.export.export` again for inference and lowering.

The QAT rewrite and `move_exported_model_to_eval` replace BatchNorm's eps and momentum with
torch's defaults (torchao TODO: "allow setting eps"); MobileNetV3 uses eps=1e-3, momentum=0.01,
so `restore_bn_literals` puts the model's own values back (eps also in the fused pattern's
`sqrt(running_var + eps)`). convert_pt2e then folds each conv-BN pair with its own fixed eps=1e-5,
so `fold_with_model_eps` shifts the running variances to make that fold the model's. Without either,
the folded int8 weights would differ from the trained network's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench.config import AugmentConfig, OptimizerConfig, QuantizeConfig, SchedulerConfig
from mobilebench.data import Split
from mobilebench.deploy.common import Source, quiet, random_batch, runner_accuracy
from mobilebench.deploy.executorch import MAX_BATCH, batch_shapes
from mobilebench.deploy.executorch import example_input as pte_example
from mobilebench.deploy.onnx import batch_dim
from mobilebench.distill import DistillationLoss, TeacherModel
from mobilebench.errors import UserError
from mobilebench.loader import TensorLoader
from mobilebench.optim import build_optimizer, build_scheduler

WEIGHT_DECAY = 5e-5  # as prune's fine-tune: a short tune at a small lr barely needs any
BN_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default",
          "aten._native_batch_norm_legit_no_training.default", "aten.cudnn_batch_norm.default")
TORCHAO_FOLD_EPS = 1e-5  # the eps of the BatchNorm that convert_pt2e folds into each QAT conv
TRAINING_ARG = 5  # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)


def qat_quantizer() -> Any:
    """XNNPACK's symmetric int8 config for QAT: the PTQ quantizer's scheme (per-channel weights,
    per-tensor activations) with fake-quantizers in place of observers."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))


# --- BatchNorm nodes of an exported graph -------------------------------------------------------


def bn_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in BN_OPS]


def bn_literals(model: nn.Module) -> dict[str, tuple[float | None, float]]:
    """running_mean buffer name -> (momentum, eps) of each BatchNorm of the eager model."""
    return {f"{name}.running_mean": (m.momentum, m.eps) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _buffer_name(node: torch.fx.Node) -> str:
    arg = node.args[3]
    return str(arg.target) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else ""


def _literals_of(node: torch.fx.Node, literals: dict[str, tuple[float | None, float]]) -> tuple[float | None, float] | None:
    """The eager BatchNorm's (momentum, eps) for a batch_norm node, matched by its running_mean buffer."""
    name = _buffer_name(node).replace("_", ".")  # get_attr targets may be flattened
    return next((v for k, v in literals.items() if k.replace("_", ".") == name), None)


def restore_bn_literals(gm: torch.fx.GraphModule, literals: dict[str, tuple[float | None, float]]) -> int:
    """Give each batch_norm node (and the fused pattern's `running_var + eps`) the model's own
    momentum and eps; returns how many BatchNorms were matched."""
    matched = 0
    for node in bn_nodes(gm):
        found = _literals_of(node, literals)
        if found is None:
            continue
        momentum, eps = found
        args = list(node.args)
        if str(node.target) == "aten._native_batch_norm_legit_no_training.default":
            args[5:7] = [momentum if momentum is not None else 0.1, eps]
        else:
            args[6:8] = [momentum if momentum is not None else 0.1, eps]
        node.args = tuple(args)
        running_var = node.args[4]
        for user in list(running_var.users) if isinstance(running_var, torch.fx.Node) else []:
            if str(user.target) == "aten.add.Tensor" and user.args[0] is running_var and isinstance(user.args[1], float):
                user.args = (running_var, eps)
        matched += 1
    gm.recompile()
    return matched


def switch_mode(gm: torch.fx.GraphModule, literals: dict[str, tuple[float | None, float]], train: bool) -> None:
    """torchao's train/eval switch of an exported graph (BatchNorm, dropout), then the model's own
    BatchNorm momentum and eps back: the switch resets them to torch's defaults."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    with quiet():
        (move_exported_model_to_train if train else move_exported_model_to_eval)(gm)
    restore_bn_literals(gm, literals)


def freeze_bn_stats(gm: torch.fx.GraphModule) -> None:
    """From now on every BatchNorm normalises with its running statistics and no longer updates them."""
    for node in bn_nodes(gm):
        if str(node.target) != "aten._native_batch_norm_legit_no_training.default":
            args = list(node.args)
            args[TRAINING_ARG] = False
            node.args = tuple(args)
    gm.recompile()


def bn_frozen(gm: torch.fx.GraphModule) -> bool:
    return all(str(n.target) == "aten._native_batch_norm_legit_no_training.default" or not n.args[TRAINING_ARG]
               for n in bn_nodes(gm))


# --- fake-quantizers -------------------------------------------------------------------------------


def fake_quantizers(gm: nn.Module) -> list[nn.Module]:
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for m in gm.modules() if isinstance(m, FakeQuantizeBase)]


def freeze_observers(gm: nn.Module) -> None:
    """Fix every quantization range where it is: the fake-quantizers keep quantizing, with frozen scales."""
    from torchao.quantization.pt2e import disable_observer

    gm.apply(disable_observer)


def observers_frozen(gm: nn.Module) -> bool:
    quantizers = fake_quantizers(gm)
    return bool(quantizers) and all(int(m.observer_enabled[0]) == 0 for m in quantizers)


# --- prepare, fine-tune, convert ----------------------------------------------------------------


def prepare_qat(source: Source) -> torch.fx.GraphModule:
    """The checkpoint's model exported in train mode with fake-quantizers and fused conv-BN patterns."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = copy.deepcopy(source.model).train()
    try:
        with quiet():
            graph = torch.export.export(model, (random_batch(source, 2),), dynamic_shapes=(batch_dim(),)).module()
            prepared = prepare_qat_pt2e(graph, qat_quantizer())
    except Exception as err:  # export and the rewriter raise many types; the first line says what failed
        raise UserError(f"preparing {source.name} for QAT failed: {str(err).strip().splitlines()[0]}") from None
    restore_bn_literals(prepared, bn_literals(source.model))
    return prepared


@dataclass
class Schedule:
    """When, in optimizer steps counted from 0, the observers and the BatchNorms freeze."""

    steps_per_epoch: int
    epochs: int
    observers_at: int  # frozen before this step runs; == total: never
    bn_at: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs


def schedule(cfg: QuantizeConfig, batches_per_epoch: int) -> Schedule:
    """Fractions of the steps -> step numbers. Observers see at least the first step: a fake-quantizer
    that never observed has scale 1 and would quantize every activation to a handful of levels."""
    per_epoch = min(batches_per_epoch, cfg.qat_steps or batches_per_epoch)
    total = per_epoch * cfg.qat_epochs
    return Schedule(per_epoch, cfg.qat_epochs, max(1, round(cfg.qat_freeze_observers * total)),
                    round(cfg.qat_freeze_bn * total))


def training_loader(split: Split, source: Source, batch_size: int, seed: int) -> TensorLoader:
    """Shuffled, cropped + flipped batches at the model's input size, as training made them (AugmentConfig defaults)."""
    loader = TensorLoader(split, batch_size, AugmentConfig(), source.mean, source.std, torch.device("cpu"),
                          torch.Generator().manual_seed(seed), channels_last=False)
    if source.image_size != split.x.shape[-1]:
        loader.image_size = source.image_size  # the checkpoint was trained with augment.resize
    return loader


def label_smoothing(source: Source) -> float:
    trainer = ((source.blob or {}).get("config") or {}).get("trainer") or {}
    return float(trainer.get("label_smoothing") or 0.0)


def finetune(gm: torch.fx.GraphModule, train: Split, source: Source, cfg: QuantizeConfig, seed: int = 0,
             on_step: Callable[[int, torch.fx.GraphModule], None] | None = None) -> dict[str, Any]:
    """SGD (Nesterov momentum 0.9, cosine from `qat_lr`) on the prepared graph, freezing on `schedule`.

    `on_step(step, gm)` runs before each step's forward pass, after that step's freezing.
    """
    if len(train) < 2:
        raise UserError(f"QAT needs training images; the checkpoint's training split has {len(train)}")
    loader = training_loader(train, source, cfg.qat_batch, seed)
    plan = schedule(cfg, len(loader))
    opt_cfg = OptimizerConfig(name="sgd", lr=cfg.qat_lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    optimizer = build_optimizer(opt_cfg, gm, cfg.qat_lr)
    scheduler = build_scheduler(SchedulerConfig(name="cosine", warmup_epochs=0.0), optimizer, cfg.qat_lr,
                                plan.steps_per_epoch, plan.epochs)
    # The engine's convention: `loss_fn(logits, y)` without a teacher, `loss_fn(logits, y, teacher_logits)` with one.
    teacher = TeacherModel(copy.deepcopy(source.model)) if cfg.qat_distill > 0 else None
    loss_fn = (DistillationLoss(cfg.qat_distill, 1.0, label_smoothing(source)) if teacher is not None
               else nn.CrossEntropyLoss(label_smoothing=label_smoothing(source)))
    step, history, t0 = 0, [], time.perf_counter()
    for epoch in range(plan.epochs):
        loss_sum = correct = seen = 0.0
        t_epoch = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i >= plan.steps_per_epoch:
                break
            if step == plan.observers_at:
                freeze_observers(gm)
            if step == plan.bn_at:
                freeze_bn_stats(gm)
            if on_step is not None:
                on_step(step, gm)
            logits = gm(x)
            loss = loss_fn(logits, y) if teacher is None else loss_fn(logits, y, teacher(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise UserError(f"QAT diverged at step {step} (loss {loss_value}); lower quantize.qat_lr={cfg.qat_lr}")
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
        history.append({"epoch": epoch + 1, "loss": round(loss_sum / max(seen, 1), 4),
                        "acc": round(correct / max(seen, 1), 4), "seconds": round(time.perf_counter() - t_epoch, 1)})
    seconds = time.perf_counter() - t0
    return {"epochs": plan.epochs, "steps": step, "steps_per_epoch": plan.steps_per_epoch, "batch_size": cfg.qat_batch,
            "images": step * cfg.qat_batch, "lr": cfg.qat_lr, "schedule": "cosine, SGD Nesterov momentum 0.9",
            "weight_decay": WEIGHT_DECAY, "label_smoothing": label_smoothing(source), "augment": "crop + flip",
            "distill_from_fp32": cfg.qat_distill,
            "observers_frozen_at_step": plan.observers_at if plan.observers_at < step else None,
            "bn_frozen_at_step": plan.bn_at if plan.bn_at < step else None,
            "seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(step, 1), 3), "history": history}


def fold_with_model_eps(gm: torch.fx.GraphModule, literals: dict[str, tuple[float | None, float]]) -> list[str]:
    """Make convert_pt2e fold each conv-BN pair with the model's own eps; returns the shifted buffers.

    convert_pt2e swaps the QAT conv-BN pattern for a replacement BatchNorm with eps fixed at 1e-5
    (torchao's "TODO: allow setting eps") and folds that into the conv, so for MobileNetV3 (eps 1e-3)
    the int8 weights would be a different function from the one fine-tuned, and larger than the
    weight scales fitted to it. Adding (eps - 1e-5) to each running_var makes sqrt(var' + 1e-5)
    equal sqrt(var + eps): the fold is exact. Only for the fold: call it right before convert_pt2e."""
    shifted = []
    for node in bn_nodes(gm):
        found = _literals_of(node, literals)
        running_var = node.args[4]
        if found is None or not isinstance(running_var, torch.fx.Node) or found[1] == TORCHAO_FOLD_EPS:
            continue
        _attr(gm, str(running_var.target)).data.add_(found[1] - TORCHAO_FOLD_EPS)
        shifted.append(str(running_var.target))
    return shifted


def convert_qat(gm: torch.fx.GraphModule, source: Source) -> torch.fx.GraphModule:
    """Eval mode (BatchNorm on running statistics, dropout off), then the int8 graph with BN folded."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    literals = bn_literals(source.model)
    switch_mode(gm, literals, train=False)
    freeze_bn_stats(gm)  # no-op after the line above; makes the eval BatchNorms explicit
    shifted = fold_with_model_eps(gm, literals)
    with quiet():
        converted = convert_pt2e(gm)
    # A BatchNorm convert did not fold would now normalise with a shifted variance.
    unfolded = {str(n.args[4].target) for n in bn_nodes(converted) if isinstance(n.args[4], torch.fx.Node)} & set(shifted)
    if unfolded:
        raise UserError(f"QAT convert left {len(unfolded)} BatchNorm(s) unfolded; "
                        "this model is not supported by method=qat (use method=static)")
    return converted


def drop_unused_tensors(gm: torch.fx.GraphModule) -> int:
    """Delete the parameters and buffers no node reads; returns how many.

    convert_pt2e reads the int8 weights from new `_frozen_param` constants and leaves the float
    conv weights, and after QAT the folded BatchNorms' scales and shifts, on the module. The re-export
    lifts every parameter, and ExecuTorch stored the unused BatchNorm ones outside the delegate
    (about 8% of a width-0.25 V1 .pte)."""
    used = {id(_attr(gm, str(n.target))) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if id(tensor) not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
            dropped += 1
    return dropped


def _attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def inference_program(gm: torch.fx.GraphModule, source: Source) -> torch.export.ExportedProgram:
    """The converted int8 graph exported again, batch 1..MAX_BATCH as every .pte: what `lower_to_pte` takes."""
    drop_unused_tensors(gm)
    try:
        with quiet():  # the .pte's batch bound: the runtime plans its buffers for it (pte_runner cuts bigger batches)
            return torch.export.export(gm, pte_example(source.image_size), dynamic_shapes=batch_shapes(MAX_BATCH))
    except Exception as err:
        raise UserError(f"re-exporting the int8 graph failed: {str(err).strip().splitlines()[0]}") from None


def graph_accuracy(gm: nn.Module, split: Split, source: Source, batch_size: int) -> float:
    """Top-1 of an exported graph run in PyTorch (no .eval(): the graph is already in eval form)."""
    return runner_accuracy(lambda x: gm(x).detach().numpy(), split, source, batch_size)


def export_onnx_qdq(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str] | None,
                    threads: int) -> tuple[Path | None, dict[str, Any]]:
    """The converted int8 program through the dynamo ONNX exporter: quantize/dequantize become
    QuantizeLinear/DequantizeLinear, which onnxruntime fuses into QLinearConv. Returns (path or None,
    a report: what happened in one line, and the ops onnxruntime runs)."""
    from mobilebench.deploy.common import INPUT_NAME, OUTPUT_NAME, require
    from mobilebench.deploy.int8 import runtime_ops
    from mobilebench.deploy.onnx import write_metadata

    call = "torch.onnx.export(<converted ExportedProgram>, dynamo=True)"
    try:
        require("onnx"), require("onnxscript"), require("onnxruntime")
        with quiet():
            torch.onnx.export(program, (), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], external_data=False)
        if metadata:
            write_metadata(path, metadata)
        ops = runtime_ops(path, threads)
    except UserError as err:
        return None, {"note": f"not exported: {err}", "call": call}
    except Exception as err:  # the exporter and onnxruntime raise many types
        return None, {"note": f"not exported: {call} failed: {str(err).strip().splitlines()[0][:300]}", "call": call}
    note = (f"exported: QuantizeLinear/DequantizeLinear pairs; onnxruntime runs {ops.get('QLinearConv', 0)} QLinearConv "
            f"and {ops.get('QGemm', 0)} QGemm nodes")
    return path, {"note": note, "call": call, "runtime_ops": ops}
