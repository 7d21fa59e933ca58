"""`mobilebench bench train`: a tiny synthetic run writes a complete bench.json (no timing claims)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from mobilebench.bench import PILImages, minor_page_faults, standard_transform
from mobilebench.cli import main
from mobilebench.config import AugmentConfig
from mobilebench.data import Split
from mobilebench.loader import TensorLoader

from .conftest import compose_config

TINY_BENCH = [
    "model=v3_small", "model.width_mult=0.25", "data=synthetic", "data.train_subset=96", "data.val_size=16",
    "data.test_subset=16", "data.batch_size=32", "trainer.threads=1", "bench.steps=2", "bench.warmup_steps=1",
    "bench.data_batches=3", "bench.data_warmup_batches=1", "bench.rounds=2",
    "bench.baseline_threads=1",  # two spinning OpenMP threads crawl on a busy 2-core machine
]


def test_bench_train_writes_both_figures_and_ratios(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["bench", "train", *TINY_BENCH, f"hydra.run.dir={tmp_path}/run"])
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    figures = ("data_images_per_s", "data_baseline_images_per_s", "train_images_per_s", "train_baseline_images_per_s")
    for key in (*figures, "data_ratio", "train_ratio"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["data_ratio"] == pytest.approx(result["data_images_per_s"] / result["data_baseline_images_per_s"])
    assert result["train_ratio"] == pytest.approx(result["train_images_per_s"] / result["train_baseline_images_per_s"])
    assert result["threads"] == 1 and result["baseline_threads"] == 1 and result["torch"] == torch.__version__
    assert result["device"].startswith("cpu") and result["precision"] in ("fp32", "bf16")
    assert result["model"] == "v3_small" and result["batch_size"] == 32 and result["baseline_workers"] == 2
    # Each side under its own allocator policy: the trainer's default, and glibc's for the baseline.
    from mobilebench.accel.allocator import _glibc

    expected = ("cache", "system") if _glibc() else ("n/a (not glibc)",) * 2
    assert (result["cpu_allocator"], result["baseline_cpu_allocator"]) == expected
    assert len(result["rounds"]["train"]) == len(result["rounds"]["train_baseline"]) == 2
    # mobilebench's side trains with V3-Small's fast paths: 9 SE blocks, and its 8 5x5 depthwise
    # convs on the native kernel wherever a C compiler is found; the baseline is the plain model.
    has_cc = any(shutil.which(cc) for cc in ("cc", "gcc", "clang")) and os.environ.get("MOBILEBENCH_NATIVE_KERNELS") != "0"
    assert result["cpu_kernels"]["setting"] == "auto" and result["cpu_kernels"]["swapped"]["se"] == 9
    assert result["cpu_kernels"]["swapped"]["depthwise_native"] == (8 if has_cc else 0)
    assert (result["native_kernels"] == "on") == bool(has_cc)
    assert result["baseline"].startswith("plain model (no fast paths)")
    for key in ("train_page_faults_per_step", "train_baseline_page_faults_per_step"):
        assert result[key] is None or result[key] >= 0, key
    out = capsys.readouterr().out
    assert "data pipeline alone" in out and "training steps" in out
    if result["train_page_faults_per_step"] is not None:
        assert "Page faults per training step" in out


@pytest.mark.skipif(minor_page_faults() is None, reason="getrusage is Unix-only")
def test_minor_page_faults_counts_first_touches() -> None:
    import mmap

    size = 16 << 20
    region = mmap.mmap(-1, size)  # anonymous: every page faults on its first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per base page even where THP is "always"
    before = minor_page_faults()
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 1
    assert minor_page_faults() - before >= size // mmap.PAGESIZE
    region.close()


def test_default_bench_config_is_typed_with_both_modes_keys() -> None:
    from mobilebench.config import BenchConfig

    config, _ = compose_config(["command=bench"])
    assert config.bench == BenchConfig()
    assert config.bench.batch_sizes == [1, 32] and config.bench.repeats == 50 and config.bench.steps == 5


def test_bench_without_the_fast_paths_reports_none(tmp_path: Path) -> None:
    main(["bench", "train", *TINY_BENCH, "bench.rounds=1", "trainer.cpu_kernels=off", f"hydra.run.dir={tmp_path}/run"])
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert result["cpu_kernels"] == {"setting": "off", "swapped": {}}
    assert result["native_kernels"].startswith("off")


def test_bad_bench_value_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "train", *TINY_BENCH, "bench.steps=0", f"hydra.run.dir={tmp_path}/run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "mobilebench: error: bench.steps=0 is out of range; it must be >= 1"


def test_baseline_sees_the_same_images_as_the_engine() -> None:
    """Without crop and flip both pipelines must hand the model identical normalized tensors."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(8))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    config, _ = compose_config(["augment=none"])
    dataset = PILImages(split, standard_transform(config, mean, std))
    ours = TensorLoader(split, 8, AugmentConfig(crop_padding=0, flip=False), mean, std, torch.device("cpu"), gen,
                        channels_last=False)
    x, y = next(iter(ours))
    for img, label in zip(x, y):
        theirs, their_label = dataset[int(label)]
        assert their_label == int(label)
        torch.testing.assert_close(img, theirs, atol=1e-5, rtol=1e-5)
