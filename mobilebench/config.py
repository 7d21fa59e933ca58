"""The typed schema every composed config is checked against before any work starts.

Plain dataclasses, one per config group (no Hydra or OmegaConf here): `cli.py` merges the composed
YAML into them, which rejects unknown keys and wrong types, then `validate.py` checks ranges and
choices. Each group has one dataclass holding the fields of all its options, so a typo in any
option is an error rather than a silently ignored key. Commands receive these dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, TypeVar

from mobilebench.errors import UserError

T = TypeVar("T")
STEMS = ("cifar", "imagenet")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
POLICIES = ("none", "trivialaugment", "autoaugment")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("cosine", "step", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE = ("auto", "on", "off")
CPU_ALLOCATORS = ("cache", "system")
NAN_POLICIES = ("stop", "skip")
TTA = ("none", "flip")
TEACHER_INPUTS = ("full", "student")
CPU_KERNELS = ("auto", "on", "off")
COMMANDS = ("train", "eval", "summary", "bench", "export", "quantize", "prune", "predict")
BENCH_MODES = ("train", "latency")
LATENCY_BACKENDS = ("pytorch", "onnx_fp32", "onnx_int8", "executorch_fp32", "executorch_int8")
EXPORT_FORMATS = ("onnx", "pt2", "executorch")
EXPORTERS = ("dynamo", "torchscript")
QUANTIZE_METHODS = ("static", "dynamic", "qat")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QAT_RANGES = ("histogram", "moving")
# Node groups a user can keep in float with quantize.exclude (deploy/int8.py finds them in the graph).
QUANTIZE_GROUPS = ("stem", "depthwise", "se", "hardswish", "head")
PRUNE_METHODS = ("l1_unstructured", "channel")


@dataclass
class ModelConfig:
    name: str = "v3_small"
    width_mult: float = 1.0
    stem: str = "cifar"
    dropout: Optional[float] = None  # None: the paper's value
    pretrained: bool = False
    num_classes: Optional[int] = None  # None: taken from the data set
    # Expanded width of each inverted-residual row, set by channel pruning so a pruned
    # checkpoint rebuilds its own (smaller) model.
    hidden_channels: Optional[list[int]] = None


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = True
    val_size: int = 5000
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    image_size: int = 32
    batch_size: int = 128
    num_workers: int = 2
    num_classes: Optional[int] = None  # synthetic only; others read it from the files
    mean: Optional[list[float]] = None  # None: measured on the training split
    std: Optional[list[float]] = None
    split_seed: int = 0  # fixed so every seed of a sweep validates on the same images
    cache_dir: Optional[str] = None  # imagefolder decode cache; None: beside the data
    device_resident: str = "auto"  # keep the uint8 set on the training device: auto|on|off


@dataclass
class AugmentConfig:
    name: str = "basic"
    crop_padding: int = 4  # 0 disables the random crop
    flip: bool = True
    cutout: int = 0  # side of a zeroed square, 0 disables
    policy: str = "none"  # per-image policy; needs the DataLoader path
    random_erasing: float = 0.0  # probability; needs the DataLoader path
    resize: Optional[int] = None  # the tutorial's Resize(224); needs the DataLoader path
    # Progressive resizing (the FFCV / fast.ai trick): early epochs train on batches downscaled
    # to `min_size`, growing linearly to data.image_size over the first `ramp` fraction of the
    # epochs; later epochs and all evaluation run at full size. null disables.
    min_size: Optional[int] = None
    ramp: float = 0.8
    size_step: int = 4  # sizes are rounded down to a multiple of this
    # MixUp / CutMix on whole batches (mobilebench/mixing.py): Beta(alpha, alpha) weights, 0 disables.
    # With both on, each mixed batch uses one of them, half the time each.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # chance that a batch is mixed

    def needs_dataloader(self) -> bool:
        """Whether a policy exists only per image (the torchvision DataLoader path), not batched."""
        return self.policy != "none" or self.random_erasing > 0 or self.resize is not None


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop smoothing
    # lr is given for this batch size and scaled linearly with data.batch_size * world size.
    base_batch_size: Optional[int] = None


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    eta_min: float = 0.0  # absolute lr at the end of the cosine
    step_size: int = 30  # epochs, step scheduler
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: str = "off"
    grad_clip: float = 0.0  # max grad norm, 0 disables
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50  # steps between plain log lines
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests and benchmarks
    resume: Optional[str] = None  # auto, or a checkpoint path
    overwrite: bool = False
    nan_policy: str = "stop"
    nan_skip_limit: int = 10
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    cpu_allocator: str = "cache"  # cache: glibc keeps freed tensor memory for reuse; system: glibc's own policy
    # The CPU fast paths of mobilebench.accel for training: auto (eager CPU runs), on, off.
    cpu_kernels: str = "auto"
    progress: str = "auto"  # auto|bar|log
    sync_bn: bool = False
    bn_momentum: Optional[float] = 0.1  # None: each model's own (V3: 0.01)
    # Test-time augmentation for the final test pass (train) and `mobilebench eval`: flip averages
    # the logits of each image and its mirror. test_acc stays the single-view figure; the
    # averaged one is reported beside it as test_acc_tta. Validation is always single-view.
    tta: str = "none"


@dataclass
class SummaryConfig:
    format: str = "table"  # table|json


@dataclass
class BenchTrainConfig:
    """`bench train`: mobilebench's training path against the standard PyTorch pipeline."""

    steps: int = 5  # timed training steps per side per round
    warmup_steps: int = 2  # untimed steps before each timed chunk (allocator, worker queues)
    data_batches: int = 40  # timed batches per side per round, data pipeline alone
    data_warmup_batches: int = 4
    rounds: int = 2  # alternations of mobilebench / baseline; more rounds average out load drift
    baseline_workers: int = 2  # DataLoader workers of the standard pipeline
    baseline_threads: Optional[int] = None  # intra-op threads of the baseline; None: torch's default
    json: str = "bench.json"  # written into the run dir


@dataclass
class LatencyConfig:
    """`bench latency`: milliseconds per batch, PyTorch eager against onnxruntime fp32 / int8."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    repeats: int = 50  # timed calls per backend and batch size, in 5 rounds with the backends taking turns
    warmup: int = 5  # untimed calls first
    threads: Optional[int] = None  # intra-op threads for PyTorch and onnxruntime; None: trainer.threads, else torch's default
    # None: every backend whose runtime is installed (the ExecuTorch ones need the `mobile` extra);
    # a list names exactly the backends to time, and a missing runtime is then an error.
    backends: Optional[list[str]] = None
    calib_size: int = 256  # images that calibrate the int8 model
    exporter: str = "dynamo"  # ONNX exporter (see export.exporter)


@dataclass
class BenchConfig(LatencyConfig, BenchTrainConfig):
    """The `bench` group: one flat list of keys; each mode reads its own."""

    mode: str = "train"  # set by the command word: `bench train` or `bench latency`


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx | pt2 (torch.export) | executorch (.pte, XNNPACK delegate)
    int8: bool = False  # executorch only: PT2E post-training int8 (XNNPACK quantizer), calibrated on quantize.calib_size images
    # int8 moves logits by design and flips low-margin images: 98.3% agreement at -0.11 points of
    # accuracy on the 36-epoch v3_small; a broken quantization agrees far less.
    int8_min_agreement: float = 0.95
    exporter: str = "dynamo"  # ONNX only: dynamo (torch.export based) | torchscript (legacy, faster to run)
    opset: Optional[int] = None  # None: the exporter's default
    parity_images: int = 1000  # test images compared between PyTorch and the exported model
    batch_size: int = 250
    atol: float = 1e-4  # max |logit difference| allowed
    min_agreement: float = 0.999  # fraction of images whose top-1 class must agree
    threads: Optional[int] = None  # None: trainer.threads, else torch's default


@dataclass
class QuantizeConfig:
    method: str = "static"  # static (onnxruntime QDQ int8) | dynamic (the tutorial's torch quantize_dynamic)
    calib_size: int = 512  # training images used to calibrate activation ranges
    calib_batch: int = 64
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = True  # one weight scale per output channel
    # 7-bit weights, avoiding u8s8 overflow on x86 CPUs without VNNI; None: on exactly those CPUs.
    reduce_range: Optional[bool] = None
    rewrite: bool = True  # exact rewrites so V3's h-swish, SE gates and pooling run in int8 (deploy/rewrite.py)
    preprocess: bool = False  # run onnxruntime's quant_pre_process (shape inference + graph optimisation) first
    # Node groups kept in float (QUANTIZE_GROUPS). None: the measured default per model family;
    # [] quantizes every op onnxruntime can.
    exclude: Optional[list[str]] = None
    op_types: Optional[list[str]] = None  # restrict to these ONNX op types; None: all onnxruntime supports
    test_images: Optional[int] = None  # None: the whole test split
    eval_batch: int = 256
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    repeats: int = 30
    threads: Optional[int] = None  # None: trainer.threads, else torch's default
    exporter: str = "dynamo"  # ONNX exporter for the fp32 graph (see export.exporter)
    # method=qat: PT2E quantization-aware fine-tuning, then an int8 ExecuTorch program.
    qat_epochs: int = 1
    qat_lr: float = 0.001  # peak lr of the fine-tune's cosine (SGD, Nesterov momentum 0.9)
    qat_batch: int = 128
    qat_steps: Optional[int] = None  # cap on steps per QAT epoch (smoke tests)
    qat_freeze_observers: float = 0.5  # fraction of the QAT steps after which observers stop updating
    qat_freeze_bn: float = 0.75  # fraction of the QAT steps after which BatchNorm statistics are frozen
    qat_distill: float = 1.0  # weight of KL(fp32 model || QAT model) in the fine-tune's loss; 0: labels only
    # Activation ranges: histogram = fitted on calib_size images as PTQ does, then fixed (deploy/qat_ranges.py);
    # moving = torchao's moving-average min/max over the fine-tune's batches.
    qat_ranges: str = "histogram"


@dataclass
class PruneConfig:
    method: str = "l1_unstructured"  # l1_unstructured | channel
    amount: float = 0.2  # fraction of weights (unstructured) or of expanded channels (channel) to remove
    bn_calib_images: int = 1024  # training images that re-estimate BatchNorm statistics after pruning (0: keep them)
    finetune_epochs: int = 0  # short fine-tune after pruning (0: none)
    finetune_lr: float = 0.01  # peak lr of the fine-tune's cosine schedule (SGD, Nesterov momentum 0.9)
    finetune_batch: int = 128
    finetune_steps: Optional[int] = None  # cap on steps per fine-tune epoch
    weight_decay: float = 5e-5
    test_images: Optional[int] = None  # None: the whole test split
    eval_batch: int = 256
    threads: Optional[int] = None  # None: trainer.threads, else torch's default
    seed: int = 0


@dataclass
class TensorBoardConfig:
    log_dir: str = "tensorboard"  # relative to the run dir


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # None: sqlite:///<working dir>/outputs/mlflow.db (printed at the start)
    experiment_name: str = "mobilebench"
    run_name: Optional[str] = None  # None: the run dir's path under outputs/


@dataclass
class LoggerConfig:
    """`logger=tensorboard`, `logger=mlflow` or `logger=[tensorboard,mlflow]`; a section left None is off."""

    tensorboard: Optional[TensorBoardConfig] = None
    mlflow: Optional[MlflowConfig] = None


@dataclass
class PredictConfig:
    top_k: int = 5  # classes listed per image
    batch_size: int = 64
    threads: Optional[int] = None  # None: trainer.threads, else torch's default
    table_rows: int = 50  # images shown in the terminal table; the files hold all of them


@dataclass
class DistillConfig:
    """Knowledge distillation (mobilebench/distill.py); off while `teacher` is None."""

    teacher: Optional[str] = None  # a mobilebench checkpoint or run dir; its model is rebuilt from it
    alpha: float = 0.9  # weight of the soft (teacher) term; 1 - alpha weighs the labels' cross-entropy
    temperature: float = 4.0
    # What the teacher sees while progressive resizing shrinks the student's batch: "full" the same
    # augmented batch before it is shrunk, "student" exactly the student's tensor.
    teacher_input: str = "full"


@dataclass
class Config:
    command: str = "train"
    checkpoint: Optional[str] = None
    # `predict`: image files and/or folders (searched recursively); `inputs=a.png` is a one-item list.
    inputs: Optional[list[str]] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def section_from_dict(schema: type[T], values: Mapping[str, Any] | None) -> T:
    """A flat section (e.g. `DataConfig`) from a stored config dict, such as a checkpoint's.

    Keys this version no longer has are dropped and missing ones take their defaults, so the
    config of a checkpoint written by an older mobilebench still reads.
    """
    known = {f.name for f in fields(schema)}  # type: ignore[arg-type]
    return schema(**{k: v for k, v in dict(values or {}).items() if k in known})


class ConfigError(UserError):
    """A user mistake in the configuration; the CLI prints it as one line and exits 2."""
