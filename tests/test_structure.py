"""The package's layout: import layers without circles, module sizes, a torch-free report command.

The layers say which module may import which: a module imports only modules of lower layers (the
``invariance`` package's private modules import each other without circles). The list is the
README's architecture section in code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sdm"

# Lowest first. `invariance` stands for the package and all its private modules.
LAYERS: list[set[str]] = [
    {"records", "_optimizers", "_engine", "_trends", "lr_control", "_compile", "_sync", "_cost"},
    {"config", "units", "functional", "theory", "rundata", "_schedule"},
    {"metric", "simulation", "invariance", "equilibrium", "plot", "_messages", "advice"},
    {"monitor", "cli", "validation", "audit"},
    {"actions", "integrations", "_discovery", "_resume"},
    {"_notices"},
    {"callback", "_fabric_plugin"},
    {"plugin", "weight_decay"},
]
# Entry points that only forward to other modules.
FACADES = {"__init__", "__main__"}
LARGEST_MODULE = 800
LARGEST_CALLBACK = 470  # Lightning plumbing only (782 before the structure issue)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def _group(module: str) -> str:
    return "invariance" if module.split(".")[0] == "invariance" else module


def _internal_imports(path: Path) -> set[str]:
    """Modules of the package imported anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_sdm":
                names.update(alias.name for alias in node.names)
            elif node.module.startswith("lightning_sdm."):
                names.add(node.module.removeprefix("lightning_sdm."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lightning_sdm."):
                    names.add(alias.name.removeprefix("lightning_sdm."))
    return names


def _layer(module: str) -> int:
    group = _group(module)
    for index, layer in enumerate(LAYERS):
        if group in layer:
            return index
    raise AssertionError(f"lightning_sdm.{module} is in no layer of tests/test_structure.py")


def test_every_module_imports_only_lower_layers():
    violations = []
    for module, path in _modules().items():
        if module.split(".")[-1] in FACADES and _group(module) != "invariance":
            continue
        for imported in _internal_imports(path):
            if _group(imported) == _group(module) == "invariance":
                continue  # checked for circles below
            if _layer(imported) >= _layer(module):
                violations.append(f"{module} (layer {_layer(module)}) imports {imported}")
    assert not violations, "\n".join(violations)


def test_the_invariance_package_has_no_import_circle():
    modules = {m: p for m, p in _modules().items() if _group(m) == "invariance"}
    graph = {
        m: {i for i in _internal_imports(p) if _group(i) == "invariance" and i != m}
        for m, p in modules.items()
        if not m.endswith("__init__")
    }

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, " -> ".join([*stack, node])
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for module in graph:
        visit(module, [])


def test_module_sizes():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert sizes["callback"] <= LARGEST_CALLBACK, sizes["callback"]
    large = {m: n for m, n in sizes.items() if n > LARGEST_MODULE}
    assert not large, large


HEAVY = ("torch", "torchmetrics", "lightning")


def _loaded_heavy_modules(code: str, cwd: Path) -> list[str]:
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return eval(run.stdout.strip().splitlines()[-1])


def test_the_report_command_imports_neither_torch_nor_torchmetrics(tmp_path):
    run = tmp_path / "logs" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,sdm/angular_update/net.0.weight,sdm/angular_update_theory/net.0.weight,"
        "sdm/angular_update_ratio/net.0.weight,sdm/weight_norm/net.0.weight,"
        "sdm/equilibrium_fraction\n"
        "10,0.020,0.021,0.952,3.1,0.0\n"
        "20,0.021,0.021,1.000,3.0,1.0\n"
    )
    help_only = _loaded_heavy_modules(
        """
        import contextlib, io
        from lightning_sdm.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--help"]) == 0
            assert main(["report", "--help"]) == 0
        """,
        tmp_path,
    )
    assert help_only == []
    report = _loaded_heavy_modules(
        f"""
        import contextlib, io
        from lightning_sdm.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["report", {str(tmp_path / "logs")!r}, "-o", "report.png"])
        assert code == 0, out.getvalue()
        assert "net.0.weight" in out.getvalue()
        """,
        tmp_path,
    )
    assert report == []
    assert (tmp_path / "report.png").stat().st_size > 0


@pytest.mark.parametrize("module", ["lightning_sdm", "lightning_sdm.records"])
def test_importing_the_package_or_the_records_is_light(module, tmp_path):
    assert _loaded_heavy_modules(f"import {module}", tmp_path) == []
