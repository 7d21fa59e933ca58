"""ExecuTorch builds of other models than test_executorch.py's v3_small: a channel-pruned v2 exported
with parity, and v1 fp32 + int8 programs timed by `bench latency`. A file of their own so that
pytest-xdist can run them beside that module's v3_small export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("executorch.runtime", reason="executorch is not installed (pip install 'mobilebench[mobile]')")

from mobilebench.deploy import executorch as et  # noqa: E402
from mobilebench.deploy.export import run_export  # noqa: E402
from mobilebench.deploy.latency import run_latency  # noqa: E402
from mobilebench.deploy.prune import run_prune  # noqa: E402

from .test_executorch import config, make_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_pruned_v2_exports_with_parity(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "v2.pt", "v2", width=0.35)
    run_prune(config(f"checkpoint={ckpt}", "prune.method=channel", "prune.amount=0.3", "prune.bn_calib_images=32",
                     "prune.test_images=32"), {}, tmp_path / "prune")
    # The re-estimated BN statistics give logits of about 50 here; PyTorch's own fp32 logits then sit
    # 2e-4 from float64's, and XNNPACK's (another summation order) as far, so the limit is relative to that.
    report = run_export(config(f"checkpoint={tmp_path / 'prune' / 'pruned.pt'}", "export.format=executorch",
                               "export.parity_images=32", "export.atol=1e-3"), tmp_path / "export")
    assert report["parity"]["passed"] and report["parity"]["agreement"] == 1.0
    assert report["delegation"]["non_delegated_nodes"] == 0 and "int8" not in report
    assert et.read_pte_metadata(tmp_path / "export" / "model.pte")["model"] == "v2"


def test_latency_times_the_executorch_backends(tmp_path: Path) -> None:
    cfg = config("bench.mode=latency", "bench.batch_sizes=[1,3]", "bench.repeats=2", "bench.warmup=1", "bench.threads=1",
                 "bench.calib_size=8", "bench.backends=[pytorch,executorch_fp32,executorch_int8]", "model=v1",
                 "model.width_mult=0.25")
    report = run_latency(cfg, tmp_path)
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert saved["backends"] == ["pytorch", "executorch_fp32", "executorch_int8"]
    assert saved["threads"]["executorch_threadpool"] == 1 and "onnxruntime_intra_op" not in saved["threads"]
    for backend in ("executorch_fp32", "executorch_int8"):
        for bs in ("1", "3"):
            row = report["results"][backend][bs]
            assert 0 < row["median_ms"] <= row["p90_ms"] and row["repeats"] == 2
        assert saved["built"][backend]["non_delegated_nodes"] == 0 and saved["built"][backend]["max_batch"] == et.MAX_BATCH
    assert saved["built"]["executorch_int8"]["convs"]["int8_share"] == 1.0
    assert set(saved["speedup"]["executorch_int8_vs_fp32"]) == {"1", "3"}
    assert set(saved["speedup"]["executorch_fp32_vs_pytorch"]) == {"1", "3"}
