"""`mobilebench prune`: the tutorial's global L1 unstructured pruning made permanent, and channel
pruning that really shrinks the network.

Unstructured pruning zeroes the smallest weights; the tensors keep their shapes, so the saved
model is exactly as large and as slow as before (the report says so). Channel pruning removes
whole expanded channels of every inverted-residual block -- the expand conv's filters with the
smallest L1 norm, the matching depthwise filters, SE channels and projection inputs -- and
rebuilds the model with `build_model(..., hidden_channels=...)`, so the pruned checkpoint has
fewer parameters and MACs and loads like any other.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebench import accel
from mobilebench.config import (
    AugmentConfig,
    Config,
    DataConfig,
    OptimizerConfig,
    PruneConfig,
    SchedulerConfig,
    TrainerConfig,
)
from mobilebench.data import Split
from mobilebench.deploy.common import (
    Source,
    load_source,
    mb,
    need_checkpoint,
    source_data,
    state_bytes,
    take,
    torch_accuracy,
    write_report,
)
from mobilebench.engine import StopFlag, TrainState, train_one_epoch
from mobilebench.errors import UserError
from mobilebench.loader import TensorLoader
from mobilebench.runtime import set_threads
from mobilebench.trainer import build_trainer
from mobilebench.validate import validate_prune

USAGE = "mobilebench prune checkpoint=outputs/train/.../checkpoints/best.pt method=channel amount=0.2"


# --- unstructured ----------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every conv and linear weight, as the tutorial's global pruning takes them."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def apply_l1_unstructured(model: nn.Module, amount: float) -> list[tuple[nn.Module, str]]:
    """Mask the `amount` fraction of smallest-magnitude weights across all layers together."""
    from torch.nn.utils import prune

    params = prunable_weights(model)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return params


def make_permanent(params: list[tuple[nn.Module, str]]) -> None:
    """Fold the masks into the weights and drop the re-parametrisation, leaving plain tensors."""
    from torch.nn.utils import prune

    for module, name in params:
        prune.remove(module, name)


def sparsity(model: nn.Module) -> dict[str, float]:
    weights = [m.weight for m, _ in prunable_weights(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {"conv_linear_weights": zeros / max(total, 1), "all_params": all_zeros / max(all_total, 1)}


# --- channel pruning ---------------------------------------------------------------------------


def inverted_residuals(model: nn.Module) -> list[Any]:
    from mobilebench.models import InvertedResidual

    return [m for m in getattr(model, "features", []) if isinstance(m, InvertedResidual)]


def kept_width(hidden: int, amount: float) -> int:
    """The pruned expanded width: a multiple of 8 (as the families build them), never wider than before."""
    from mobilebench.models import make_divisible

    return max(1, min(hidden, make_divisible(hidden * (1.0 - amount), 8)))


def top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (keeps the layout recognisable)."""
    return scores.topk(k).indices.sort().values


def channel_plan(model: nn.Module, amount: float) -> list[torch.Tensor]:
    """Channels to keep in every inverted-residual block, ranked by the L1 norm of the expand filters.

    Blocks without an expand conv run their depthwise conv on the block input, whose width is fixed
    by the residual path, so they keep every channel.
    """
    plan = []
    for block in inverted_residuals(model):
        if block.expand is None:
            plan.append(torch.arange(block.hidden_channels))
            continue
        scores = block.expand.conv.weight.detach().abs().sum(dim=(1, 2, 3))
        plan.append(top_channels(scores, kept_width(block.hidden_channels, amount)))
    return plan


def _copy_conv_bn(old: nn.Module, new: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> None:
    weight = old.conv.weight
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    new.conv.weight.copy_(weight)
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(old.bn, name)
        getattr(new.bn, name).copy_(tensor[out_idx] if out_idx is not None else tensor)
    new.bn.num_batches_tracked.copy_(old.bn.num_batches_tracked)


def _copy_block(old: Any, new: Any, keep: torch.Tensor) -> None:
    if old.expand is not None:
        _copy_conv_bn(old.expand, new.expand, keep, None)
    _copy_conv_bn(old.depthwise, new.depthwise, keep, None)  # depthwise weight is [C, 1, k, k]
    if old.se is not None:
        # The squeeze narrows with the block (V3's rule: make_divisible(hidden // 4, 8)); keep its
        # strongest units, judged on the inputs that survive.
        fc1 = old.se.fc1.weight[:, keep]
        squeeze = top_channels(fc1.abs().sum(dim=(1, 2, 3)), new.se.squeeze_channels)
        new.se.fc1.weight.copy_(fc1[squeeze])
        new.se.fc1.bias.copy_(old.se.fc1.bias[squeeze])
        new.se.fc2.weight.copy_(old.se.fc2.weight[keep][:, squeeze])
        new.se.fc2.bias.copy_(old.se.fc2.bias[keep])
    _copy_conv_bn(old.project, new.project, None, keep)


def channel_prune(model: nn.Module, model_args: dict[str, Any], amount: float) -> tuple[nn.Module, dict[str, Any]]:
    """A new, narrower model with the kept weights copied in, and the build_model kwargs that rebuild it."""
    from mobilebench.models import build_model

    if not inverted_residuals(model):
        raise UserError(f"channel pruning removes channels of inverted-residual blocks, which {model_args['name']} has none of; "
                        "use prune.method=l1_unstructured or a v2 / v3 model")
    plan = channel_plan(model, amount)
    args = {**model_args, "hidden_channels": [len(keep) for keep in plan]}
    pruned = build_model(**args).eval()
    old_blocks = {id(b): keep for b, keep in zip(inverted_residuals(model), plan)}
    with torch.no_grad():
        for old, new in zip(model.features, pruned.features):
            if id(old) in old_blocks:
                _copy_block(old, new, old_blocks[id(old)])
            else:
                new.load_state_dict(old.state_dict())
        pruned.head.load_state_dict(model.head.state_dict())
    return pruned, args


# --- repair ----------------------------------------------------------------------------------------


def training_batches(split: Split, source: Source, batch_size: int, seed: int, channels_last: bool = False) -> TensorLoader:
    """Shuffled, cropped + flipped CPU batches at the model's input size, the kind training fed it."""
    loader = TensorLoader(split, batch_size, AugmentConfig(), source.mean, source.std, torch.device("cpu"),
                          torch.Generator().manual_seed(seed), channels_last=channels_last)
    loader.image_size = source.image_size
    return loader


def recalibrate_bn(model: nn.Module, split: Split, source: Source, batch_size: int = 128, seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running mean and variance on `split`, without gradients.

    Removing channels also removes their constant (BN-shift) contribution to the next layers, so the
    stored statistics no longer match; this pass alone recovers most of what pruning cost
    (docs/deployment.md, Pruning).

    The batches are the training kind: shuffled (image folders come sorted by class, and a
    single-class batch shows only within-class variance) and cropped + flipped, because the weights
    were trained against statistics of augmented batches; plain images cost the unpruned model
    itself several points.
    """
    loader = training_batches(split, source, batch_size, seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


# --- fine-tune -------------------------------------------------------------------------------------


def finetune_config(cfg: PruneConfig, trainer: TrainerConfig) -> Config:
    """The fine-tune as a training config: SGD with Nesterov momentum, cosine from `finetune_lr`."""
    return Config(
        data=DataConfig(batch_size=cfg.finetune_batch),
        optimizer=OptimizerConfig(name="sgd", lr=cfg.finetune_lr, momentum=0.9, nesterov=True,
                                  weight_decay=cfg.weight_decay),
        scheduler=SchedulerConfig(name="cosine", warmup_epochs=0.0),
        # The model keeps its own BatchNorm momentum; the fast paths and memory format follow `train`'s settings.
        trainer=TrainerConfig(epochs=cfg.finetune_epochs, device="cpu", precision="fp32", bn_momentum=None,
                              channels_last=trainer.channels_last, cpu_kernels=trainer.cpu_kernels,
                              max_steps_per_epoch=cfg.finetune_steps))


def finetune(model: nn.Module, train: Split, source: Source, cfg: PruneConfig,
             trainer_cfg: TrainerConfig) -> list[dict[str, float]]:
    """A few epochs of SGD with crop + flip; returns per-epoch loss/acc. `model` ends with the tuned weights."""
    if source.image_size != train.x.shape[-1]:
        raise UserError("fine-tuning a model trained with augment.resize is not supported; use prune.finetune_epochs=0")
    device = torch.device("cpu")
    run_cfg = finetune_config(cfg, trainer_cfg)
    loader = training_batches(train, source, cfg.finetune_batch, cfg.seed, run_cfg.trainer.channels_last)
    steps = min(len(loader), cfg.finetune_steps or len(loader))
    # The trainer swaps fast paths into its model in place: train a copy, then copy the weights back.
    trainer = build_trainer(run_cfg, copy.deepcopy(model), device, "fp32", steps)
    state, history = TrainState(), []
    for epoch in range(cfg.finetune_epochs):
        stats = train_one_epoch(trainer.parts, loader, state, StopFlag(), lambda info: None)
        history.append({"epoch": epoch + 1, "loss": round(stats.loss, 4), "acc": round(stats.acc, 4), "seconds": round(stats.seconds, 1)})
    model.load_state_dict(trainer.raw.state_dict())
    model.eval()
    return history


# --- command --------------------------------------------------------------------------------------


def pruned_payload(source: Source, model: nn.Module, args: dict[str, Any], cfg: PruneConfig) -> dict[str, Any]:
    """A checkpoint in the training format: `load_model`, eval, export and quantize rebuild it from model_args."""
    blob = source.blob or {}
    config = copy.deepcopy(blob.get("config") or {})
    config.setdefault("model", {})["hidden_channels"] = args.get("hidden_channels")
    return {
        "model_args": args, "model": model.state_dict(), "ema": None,
        "optimizer": None, "scheduler": None, "scaler": None, "state": blob.get("state"), "rng": None,
        "config": config, "data": blob.get("data"),
        "pruned": {"from": source.checkpoint, "method": cfg.method, "amount": cfg.amount, "finetune_epochs": cfg.finetune_epochs},
    }


def measure(model: nn.Module, source: Source) -> dict[str, int]:
    from mobilebench.profile import count_macs, count_params

    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": count_params(model), "nonzero_params": nonzero, "macs": count_macs(model, source.image_size)}


def run_prune(config: Config, cfg_dict: dict[str, Any], run_dir: Path, use_checkpoint_data: bool = True) -> dict[str, Any]:
    """Prune the checkpoint's plain model, re-estimate BatchNorm, optionally fine-tune; writes pruned.pt."""
    from mobilebench.checkpoint import save_checkpoint

    cfg = config.prune
    validate_prune(cfg)  # the CLI checked it already; a direct caller gets the same one-line errors
    path = need_checkpoint(config, USAGE)
    threads = set_threads(cfg.threads or config.trainer.threads)
    accel.set_cpu_allocator(config.trainer.cpu_allocator)  # the fine-tune is training: same policy as `train`
    torch.manual_seed(cfg.seed)
    source = load_source(path)
    data = source_data(source, config, use_checkpoint_data)
    test = take(data.test, cfg.test_images, seed=0)
    before = {**measure(source.model, source), "test_acc": torch_accuracy(source.model, test, source, cfg.eval_batch)}

    t0 = time.perf_counter()
    model = copy.deepcopy(source.model)
    args = dict(source.model_args)
    masks = None
    if cfg.method == "channel":
        model, args = channel_prune(model, args, cfg.amount)
    else:
        masks = apply_l1_unstructured(model, cfg.amount)
    pruned_acc = torch_accuracy(model, test, source, cfg.eval_batch)
    recal_acc = None
    if cfg.bn_calib_images:
        calib = take(data.train, cfg.bn_calib_images, seed=cfg.seed + 1)
        recalibrate_bn(model, calib, source)
        recal_acc = torch_accuracy(model, test, source, cfg.eval_batch)
        # The same pass on the unpruned model, so that stale statistics in the checkpoint itself
        # (short runs, V3's BN momentum of 0.01) are not credited to pruning.
        reference = copy.deepcopy(source.model)
        recalibrate_bn(reference, calib, source)
        before["test_acc_bn_recalibrated"] = torch_accuracy(reference, test, source, cfg.eval_batch)
    history = finetune(model, data.train, source, cfg, config.trainer) if cfg.finetune_epochs else []
    if masks is not None:
        make_permanent(masks)
    prune_s = time.perf_counter() - t0

    after = {**measure(model, source), "test_acc": torch_accuracy(model, test, source, cfg.eval_batch)}
    out = run_dir / "pruned.pt"
    save_checkpoint(pruned_payload(source, model, args, cfg), out)
    report = {
        "checkpoint": source.checkpoint, "pruned_checkpoint": str(out), "model": source.name, "method": cfg.method,
        "amount": cfg.amount, "threads": threads, "test_images": len(test), "seconds": round(prune_s, 1),
        "before": before, "after_pruning": {"test_acc": pruned_acc, "test_acc_bn_recalibrated": recal_acc,
                          "bn_calib_images": cfg.bn_calib_images}, "after": after,
        "finetune": {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "history": history},
        "hidden_channels": {"before": getattr(source.model, "hidden_channels", None), "after": args.get("hidden_channels")},
        "sparsity": sparsity(model),
        # Weights only: the source checkpoint also carries optimizer state, which would flatter the pruned file.
        "weights_bytes": {"before": state_bytes(source.model), "after": state_bytes(model)},
        "config": {"prune": cfg_dict.get("prune")},
        "note": ("unstructured pruning zeroes weights but keeps every tensor's shape: the model is no smaller and no faster "
                 "with dense kernels" if cfg.method == "l1_unstructured" else
                 "whole channels removed: the rebuilt model has fewer parameters and MACs"),
    }
    write_report(run_dir, "prune.json", report)
    print_prune(report)
    return report


def print_prune(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    b, a = report["before"], report["after"]
    tuned = f", fine-tuned {report['finetune']['epochs']} epochs" if report["finetune"]["epochs"] else ""
    table = Table(title=f"{report['model']} {report['method']} pruning, amount {report['amount']}{tuned} "
                        f"({report['test_images']} test images)")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("params", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / b['params'] - 1:+.1%}")
    table.add_row("non-zero params", f"{b['nonzero_params']:,}", f"{a['nonzero_params']:,}",
                  f"{a['nonzero_params'] / b['nonzero_params'] - 1:+.1%}")
    table.add_row("MACs", f"{b['macs'] / 1e6:.2f}M", f"{a['macs'] / 1e6:.2f}M", f"{a['macs'] / b['macs'] - 1:+.1%}")
    table.add_row("test top-1", f"{b['test_acc']:.4f}", f"{a['test_acc']:.4f}", f"{(a['test_acc'] - b['test_acc']) * 100:+.2f} points")
    pruned = report["after_pruning"]
    table.add_row("top-1 right after pruning", "", f"{pruned['test_acc']:.4f}", "")
    if pruned["test_acc_bn_recalibrated"] is not None:
        b_re, a_re = b["test_acc_bn_recalibrated"], pruned["test_acc_bn_recalibrated"]
        table.add_row(f"top-1, BN re-estimated ({pruned['bn_calib_images']} img)", f"{b_re:.4f}", f"{a_re:.4f}",
                      f"{(a_re - b_re) * 100:+.2f} points")
    size = report["weights_bytes"]
    table.add_row("weights on disk", mb(size["before"]), mb(size["after"]), f"{size['after'] / size['before'] - 1:+.1%}")
    console = Console()
    console.print(table)
    console.print(f"sparsity of conv/linear weights {report['sparsity']['conv_linear_weights']:.1%}; {report['note']}")
    console.print(f"pruned checkpoint: {report['pruned_checkpoint']}")
