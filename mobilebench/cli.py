"""The `mobilebench` command line; the only module that imports Hydra or OmegaConf.

`mobilebench <command> [overrides...]` composes conf/config.yaml with the overrides, checks the
result against the schema in `config.py` before any work starts (one line and exit 2 on a
mistake), then hands over to `hydra.main` for the run dir, logging, multirun and launchers.
Commands receive the typed `Config` (and, where they store it, the resolved config as a plain dict).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE = """usage: mobilebench <command> [key=value ...] [-m]

commands:
  train      train a model            mobilebench train model=v3_small trainer.epochs=30
  eval       evaluate a checkpoint    mobilebench eval checkpoint=outputs/.../checkpoints/best.pt
  summary    per-block params/MACs    mobilebench summary model=v2 [summary.format=json]
  bench      speed benchmarks         mobilebench bench train model=v2 | bench latency checkpoint=PATH
  export     ONNX / TorchScript       mobilebench export checkpoint=PATH format=onnx
  quantize   int8 model               mobilebench quantize checkpoint=PATH method=static
  prune      prune a model            mobilebench prune checkpoint=PATH method=channel amount=0.2
  predict    classify your images     mobilebench predict checkpoint=PATH inputs=photos/ [predict.top_k=3]
  report     comparison table, plots  mobilebench report RUN_DIR... [--out DIR]

Any config value can be overridden (model=v2 optimizer.lr=0.05); -m sweeps comma lists.
Show the composed config with: mobilebench train --cfg job"""

HYDRA_COMMANDS = ("train", "eval", "summary", "bench", "export", "quantize", "prune", "predict")
# Bare words after these commands that pick a mode (`bench train`, `export ... format=onnx`).
SUBCOMMANDS = {"bench": ("train", "latency")}
# Short forms the issue-facing commands accept: `format=onnx` means `export.format=onnx`.
SHORT_KEYS = {"export": ("format",), "quantize": ("method",), "prune": ("method", "amount")}


def fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"mobilebench: error: {message}\n")
    raise SystemExit(code)


def conf_dir() -> Path:
    """conf/ beside the package in a checkout or editable install; mobilebench/conf when installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    import importlib.resources

    return Path(str(importlib.resources.files("mobilebench.conf")))


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's own flags (-m, --cfg job, ...) from key=value overrides."""
    flags, overrides = [], []
    takes_value = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp", "--config-name", "-cn",
                   "--config-dir", "-cd", "--experimental-rerun"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in takes_value and i + 1 < len(argv) and "=" not in argv[i + 1]:
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def expand_short_keys(command: str, overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        out.append(f"{command}.{o}" if key in SHORT_KEYS.get(command, ()) else o)
    return out


def _one_line(err: BaseException) -> str:
    """OmegaConf/Hydra errors span several lines; keep the message and the key it names."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    message = lines[0] if lines else type(err).__name__
    if "Available options" in text or "Could not find" in text:
        group = message.split("'")[-2] if message.count("'") >= 2 else ""
        after = text.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = [line.strip() for line in after.splitlines()[1:] if line.strip()]
        group_name, _, bad = group.rpartition("/")
        return f"{group_name}={bad} is not an option; choose one of: {', '.join(options)}" if options else message
    if "is not in struct" in text or "Could not override" in text or "Key '" in message:
        return f"{message} (unknown key{f' {key}' if key else ''}; run `mobilebench train --cfg job` to list valid keys)"
    return f"{key}: {message}" if key and key not in message else message


def to_config(cfg: Any) -> Any:
    """Merge a composed DictConfig into the schema and run the range checks; returns a `Config`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mobilebench.config import Config
    from mobilebench.validate import validate

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain.pop("hydra", None)
        if isinstance(plain.get("inputs"), str):  # `inputs=photo.png`: a list of one
            plain["inputs"] = [plain["inputs"]]
        merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        fail(_one_line(err))
    validate(config)
    return config


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Override lists covering each value of each choice sweep, so `-m model=v1,v9` fails up front."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts, values = [], []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            try:
                choices = [f"{key}={v}" for v in o.sweep_string_iterator()]
            except Exception:  # interval sweeps are sampled by the sweeper; nothing to pre-check
                choices = []
            firsts.append(choices[0] if choices else None)
            values.append(choices)
        else:
            firsts.append(o.input_line)
            values.append([])
    base = [f for f in firsts if f is not None]
    variants = [base]
    for i, choices in enumerate(values):
        for choice in choices[1:]:
            variants.append([choice if j == i else f for j, f in enumerate(firsts) if f is not None])
    return variants


def precheck(overrides: list[str], multirun: bool) -> None:
    """Compose and validate before Hydra starts, so mistakes cost one line and no run dir."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mobilebench.errors import UserError

    try:
        variants = _sweep_variants(overrides) if multirun else [overrides]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            for variant in variants:
                to_config(compose(config_name="config", overrides=variant))
    except (HydraException, OmegaConfBaseException) as err:
        hint = ""
        if "hydra/launcher" in str(err) or "hydra/sweeper" in str(err):
            hint = "; install the plugins with: pip install 'mobilebench[scale]'"
        fail(_one_line(err) + hint)
    except UserError as err:
        fail(str(err))


def _task(cfg: Any) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from mobilebench.errors import UserError

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    config = to_config(cfg)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    task_overrides = list(hc.overrides.task)
    try:
        with _run_dir_lock(run_dir):
            return COMMANDS[config.command](config, cfg_dict, run_dir, multirun, task_overrides)
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted", code=130)


def _run_dir_lock(run_dir: Path) -> Any:
    """One writer per run dir: the main rank holds its lock while the command runs (other ranks
    of a torchrun / SLURM job write nothing there)."""
    import contextlib

    from mobilebench import runlock
    from mobilebench.runtime import launched_rank

    return runlock.holding(run_dir) if launched_rank() == 0 else contextlib.nullcontext()


def _explicit_run_dir(overrides: list[str]) -> Path | None:
    """The run dir named on the command line, if it is a plain path (no interpolation)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "hydra.run.dir" and value and "${" not in value:
            return Path(value)
    return None


def _optimising_sweeper() -> bool:
    """True under a sweeper that maximises what each job returns (Optuna), not a plain grid."""
    from hydra.core.hydra_config import HydraConfig

    return not str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".BasicSweeper")


def _train(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> float:
    from mobilebench.train import run_train

    # Without a validation split a job returns its test accuracy, and a search would tune on it.
    if multirun and config.data.val_size == 0 and _optimising_sweeper():
        fail("data.val_size=0 leaves no validation split, so the search would tune on test accuracy; "
             "set data.val_size=5000 (or any number > 0) for hparams_search")
    return run_train(config, cfg_dict, run_dir, multirun)


def _data_overridden(overrides: list[str]) -> bool:
    """Commands on a checkpoint use its training data unless the user names other data."""
    return any(o.lstrip("+~").startswith("data") for o in overrides)


def _eval(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> float:
    from mobilebench.evaluation import run_eval

    return run_eval(config, run_dir, use_checkpoint_data=not _data_overridden(overrides))


def _summary(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> None:
    from mobilebench.summary import run_summary

    run_summary(config)


def _bench(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> Any:
    if config.bench.mode == "latency":
        from mobilebench.deploy.latency import run_latency

        return run_latency(config, run_dir, use_checkpoint_data=not _data_overridden(overrides))
    from mobilebench.bench import run_bench_train

    return run_bench_train(config, run_dir)


def _export(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> Any:
    from mobilebench.deploy.export import run_export

    return run_export(config, run_dir, use_checkpoint_data=not _data_overridden(overrides))


def _quantize(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> Any:
    from mobilebench.deploy.quantize import run_quantize

    return run_quantize(config, run_dir, use_checkpoint_data=not _data_overridden(overrides))


def _prune(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> Any:
    from mobilebench.deploy.prune import run_prune

    return run_prune(config, cfg_dict, run_dir, use_checkpoint_data=not _data_overridden(overrides))


def _predict(config: Any, cfg_dict: dict, run_dir: Path, multirun: bool, overrides: list[str]) -> int:
    from mobilebench.predict import run_predict

    failed = run_predict(config, run_dir)
    if failed and not multirun:
        raise SystemExit(1)  # the other inputs were predicted and written; say some were not
    return failed


COMMANDS: dict[str, Callable[..., Any]] = {"train": _train, "eval": _eval, "summary": _summary, "bench": _bench,
                                           "export": _export, "quantize": _quantize, "prune": _prune,
                                           "predict": _predict}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "report":
        from mobilebench.report import run_report

        raise SystemExit(run_report(rest))
    if command not in HYDRA_COMMANDS:
        fail(f"unknown command {command!r}; choose one of: {', '.join(HYDRA_COMMANDS + ('report',))}")
    if command in SUBCOMMANDS:
        if not rest or rest[0] not in SUBCOMMANDS[command]:
            fail(f"`mobilebench {command}` needs one of: {', '.join(SUBCOMMANDS[command])} (e.g. mobilebench {command} {SUBCOMMANDS[command][0]})")
        rest = rest[1:] + [f"{command}.mode={rest[0]}"]
    flags, overrides = split_args(rest)
    overrides = expand_short_keys(command, overrides) + [f"command={command}"]
    multirun = "-m" in flags or "--multirun" in flags
    if not any(f in flags for f in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info")):
        precheck(overrides, multirun)

    import hydra

    if command == "train":
        from mobilebench.runtime import torchrun_overrides

        overrides += torchrun_overrides()  # torchrun ranks share rank 0's run dir
    sys.argv = [sys.argv[0], *flags, *overrides]
    import contextlib

    from mobilebench.errors import UserError

    run_dir = _explicit_run_dir(overrides) if not multirun and command != "summary" else None
    with contextlib.ExitStack() as stack:
        if run_dir is not None:
            # Taken before Hydra starts, so a second command into a busy dir stops before Hydra
            # writes its .hydra/ files and log there; _task takes the same lock again (a no-op
            # then) for the run dirs Hydra names itself.
            try:
                stack.enter_context(_run_dir_lock(run_dir))
            except UserError as err:
                fail(str(err))
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()
