"""The one-way dependency rule (docs/architecture.md), checked on every import statement of the
project, at module level and inside functions alike:

    core (moesim.errors, atomic, config, results, calibration)
      <- traces <- planner <- moesim.sim | runtime (runtime also uses kernels) <- analysis
    the CLI layer (moesim.cli, moesim.commands.*, each package's own cli module) on top.

A package's own `cli` module may import its own package and anything below it; only the CLI
layer combines packages that do not depend on each other (simulate + plot, validate).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"moesim", "moesim.errors", "moesim.atomic", "moesim.config", "moesim.results",
        "moesim.calibration", "moesim.hf_config"}

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "kernels": {"core"},
    "traces": {"core"},
    "planner": {"core", "traces"},
    "sim": {"core", "traces", "planner"},
    "runtime": {"core", "traces", "planner", "kernels"},
    "analysis": {"core", "traces", "planner", "sim"},
}


def layer_of(module: str) -> str:
    if module in CORE:
        return "core"
    if module in ("moesim.cli", "moesim.__main__") or module.startswith("moesim.commands"):
        return "cli"
    if module.startswith("moesim.sim"):
        return "sim"
    top = module.split(".")[0]
    if top == "moesim":
        raise AssertionError(f"{module}: a moesim module outside core, sim and the CLI layer")
    return top


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in ("moesim", "traces", "planner", "kernels", "runtime", "analysis"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported project module) of every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    tops = {"moesim", "traces", "planner", "kernels", "runtime", "analysis"}
    return [(ln, m) for ln, m in found if m.split(".")[0] in tops]


def test_dependencies_run_one_way() -> None:
    bad = []
    for module, path in project_modules().items():
        src = layer_of(module)
        own_cli = module.endswith(".cli") and src != "cli"
        for line, imported in imports_of(path, module):
            dst = layer_of(imported)
            if src == "cli" or dst == src:
                continue
            if own_cli and dst in ALLOWED[src] | {src}:
                continue
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {dst} ({imported})")
    assert not bad, "imports against the one-way rule:\n" + "\n".join(bad)


def test_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a planner module importing the simulator inside a function."""
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from moesim.sim.simulate import Simulator\n")
    (line, imported), = imports_of(f, "planner.bad")
    assert (line, imported) == (2, "moesim.sim.simulate")
    assert layer_of(imported) not in ALLOWED[layer_of("planner.bad")]


@pytest.mark.parametrize("modules", [
    "moesim.config, traces.io, planner.traffic",
    "moesim.cli",
])
def test_core_imports_neither_torch_nor_triton(modules: str) -> None:
    code = (f"import sys, {modules}; "
            "print(','.join(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("argv", [["trace", "stats", "--help"], ["plan", "--help"],
                                  ["--help"]])
def test_torch_free_commands_do_not_import_torch(argv: list[str]) -> None:
    code = ("import sys; from moesim.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('LOADED=' + ','.join(m for m in ('torch', 'triton', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED="
