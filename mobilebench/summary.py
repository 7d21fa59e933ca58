"""`mobilebench summary`: per-block output shape, params and MACs of a model; no data set needed."""

from __future__ import annotations

import json

from mobilebench.config import Config

# Class counts known without reading any file, so `summary` never touches the data.
KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100}


def summary_num_classes(cfg: Config) -> int:
    return cfg.model.num_classes or cfg.data.num_classes or KNOWN_CLASSES.get(cfg.data.name, 10)


def run_summary(cfg: Config) -> dict:
    """Print (or emit as JSON) the per-block table of the configured model; returns the totals."""
    from mobilebench.models import build_model
    from mobilebench.profile import count_macs, count_params, layer_summary
    from mobilebench.trainer import model_args

    model = build_model(**model_args(cfg.model, summary_num_classes(cfg)))
    size = cfg.augment.resize or cfg.data.image_size
    params, macs = count_params(model), count_macs(model, size)
    result = {"model": cfg.model.name, "params": params, "macs": macs, "input_size": [3, size, size],
              "width_mult": cfg.model.width_mult, "stem": cfg.model.stem, "num_classes": model.num_classes}
    if cfg.summary.format == "json":
        print(json.dumps(result))
        return result
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.model.name} (width {cfg.model.width_mult}, {cfg.model.stem} stem) at {size}x{size}")
    table.add_column("block")
    table.add_column("output shape", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    for row in layer_summary(model, size):
        table.add_row(row["block"], "x".join(str(d) for d in row["output_shape"][1:]), f"{row['params']:,}", f"{row['macs']:,}")
    table.add_section()
    table.add_row("total", "", f"{params:,}", f"{macs:,}")
    console = Console()
    console.print(table)
    console.print(f"{cfg.model.name}: {params:,} parameters ({params / 1e6:.2f}M), {macs:,} MACs ({macs / 1e6:.1f}M) at {size}x{size}")
    return result
