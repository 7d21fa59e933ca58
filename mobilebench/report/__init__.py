"""`mobilebench report PATH...`: the comparison table and plots, built from finished runs.

Reads top to bottom: find run dirs (by their summary.json), load each run, attach any
quantize/latency reports that point at its checkpoints, group runs that differ only in seed,
aggregate, then write report.md, report.csv, curves.png and pareto.png and print the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mobilebench.errors import UserError
from mobilebench.report.aggregate import check_data, group_runs, row_values
from mobilebench.report.plots import write_plots
from mobilebench.report.render import display_table, markdown_report, plural, print_table, write_csv
from mobilebench.report.runs import attach_deploy_reports, find_run_dirs, load_run

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
        print_table(header, cells, title=f"MobileNet comparison ({plural(len(runs), 'run')}) -> {out}")
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


def run_report(argv: list[str]) -> int:
    """The `mobilebench report` command: 0 on success, 2 with one line on a mistake."""
    try:
        args = parse_args(argv)
        build_report(args.paths, args.out, args.allow_mixed_data,
                     command=" ".join(["mobilebench report", *argv]))
    except UserError as err:
        sys.stderr.write(f"mobilebench: error: {err}\n")
        return 2
    return 0
