"""The package's layering, read from its imports (ast), and its module sizes.

- models/ describes networks only: no other mobilebench module, no torchvision at module level;
- the engine names no model and knows no CLI;
- cli.py alone imports hydra or omegaconf;
- command modules (those holding a `run_*` entry; the report package) never import each other;
- no module over 400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import mobilebench

PACKAGE = Path(mobilebench.__file__).parent
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name as written, resolved for relative imports
    top_level: bool  # at module level, not inside a function or class


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every import in `path`; `from pkg import name` counts as `pkg.name` where that is a module."""
    tree = ast.parse(path.read_text())
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found: list[Import] = []
    for node in ast.walk(tree):
        at_top = id(node) in top
        if isinstance(node, ast.Import):
            found += [Import(alias.name, at_top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (root.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                    (root.parent / Path(*candidate.split(".")) / "__init__.py").is_file()
                found.append(Import(candidate if is_module else base, at_top))
    return found


def command_units(root: Path) -> dict[str, str]:
    """module -> the command it belongs to: a module with a top-level `run_*` function is one;
    a package whose __init__ has one is one command with all its modules."""
    units: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name.startswith("run_") for n in tree.body):
            units[module_name(root, path)] = module_name(root, path)
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        package = name.rpartition(".")[0]
        if package in units and (root.parent / Path(*package.split(".")) / "__init__.py").is_file():
            units.setdefault(name, package)
    return units


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at `root`, one line each."""
    pkg = root.name
    units = command_units(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{name} has {lines} lines (at most {MAX_LINES})")
        for imp in imports_of(root, path):
            target, first = imp.target, imp.target.split(".")[0]
            if name.startswith(f"{pkg}.models") and target.startswith(f"{pkg}.") and not target.startswith(f"{pkg}.models"):
                found.append(f"{name} imports {target}: models/ describes networks and imports no other {pkg} module")
            if name.startswith(f"{pkg}.models") and first == "torchvision" and imp.top_level:
                found.append(f"{name} imports torchvision at module level")
            if name == f"{pkg}.engine" and (target.startswith(f"{pkg}.models") or target == f"{pkg}.cli"):
                found.append(f"{name} imports {target}: the engine names no model and knows no CLI")
            if first in ("hydra", "omegaconf") and name != f"{pkg}.cli":
                found.append(f"{name} imports {target}: only {pkg}.cli imports hydra or omegaconf")
            if name in units and units.get(target, units[name]) != units[name]:
                found.append(f"command {units[name]} ({name}) imports command {units[target]}")
    return found


def test_the_package_keeps_its_layers() -> None:
    assert violations(PACKAGE) == []


def test_the_commands_are_found() -> None:
    units = set(command_units(PACKAGE).values())
    assert units == {f"mobilebench.{m}" for m in ("train", "evaluation", "bench", "summary", "report", "deploy.export",
                                                 "deploy.quantize", "deploy.prune", "deploy.latency", "predict")}


def test_the_checker_catches_each_kind_of_break(tmp_path: Path) -> None:
    """A planted package with one violation of each rule: the checker must name every one."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "models/__init__.py": "from .blocks import Block\nfrom pkg import engine\nimport torchvision\n",
        "models/blocks.py": "def f():\n    import torchvision  # inside a function: allowed\n",
        "engine.py": "from pkg.models import Block\n",
        "data.py": "from omegaconf import OmegaConf\n",
        "cli.py": "import hydra\n",
        "train.py": "from pkg.evaluation import run_eval\ndef run_train(): ...\n",
        "evaluation.py": "def run_eval(): ...\n",
        "report/__init__.py": "from pkg.report.render import x\ndef run_report(): ...\n",
        "report/render.py": "x = 1\n" + "y = 2\n" * MAX_LINES,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = violations(root)
    expected = [
        "pkg.engine imports pkg.models",
        "pkg.models imports pkg.engine",
        "pkg.models imports torchvision at module level",
        "pkg.data imports omegaconf",
        "command pkg.train (pkg.train) imports command pkg.evaluation",
        f"pkg.report.render has {MAX_LINES + 1} lines",
    ]
    for piece in expected:
        assert any(line.startswith(piece) for line in found), (piece, found)
    assert len(found) == len(expected), found  # and nothing else: cli's hydra and report's own modules are fine


def test_importing_the_models_imports_neither_torchvision_nor_the_fast_paths() -> None:
    code = ("import sys, mobilebench.models as m; m.build_model('v3_small'); "
            "print(sorted(k for k in sys.modules if k.startswith(('torchvision', 'mobilebench.accel', 'mobilebench.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    loaded = eval(out)  # noqa: S307 - our own subprocess's repr of a list of strings
    assert not any(k.startswith(("torchvision", "mobilebench.accel")) for k in loaded), loaded
    assert all(k.startswith("mobilebench.models") for k in loaded if k.startswith("mobilebench.")), loaded


@pytest.mark.parametrize("module", ["mobilebench.models.blocks", "mobilebench.models.network"])
def test_the_blocks_are_plain(module: str) -> None:
    """No custom autograd, autocast or device checks, native kernels or torch private internals in the networks."""
    text = (PACKAGE.parent / Path(*module.split("."))).with_suffix(".py").read_text()
    for banned in ("torch.autograd", "autograd.Function", "autocast", ".device.type", "ctypes", "torch.nn.modules.module",
                   "_global_forward", "is_compiling", "mobilebench.accel"):
        assert banned not in text, banned
