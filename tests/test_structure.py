"""The package's layout rules, in code: the README's architecture section is their prose.

* the folders (and the few flat modules) import each other without a circle;
* Lightning is imported inside ``lightning_sdm/lightning/`` only; the actions know neither the
  monitor nor a Trainer; nothing below the adapters imports them;
* the report side (``report/``, ``records``, ``keys``) imports no torch, and neither does
  ``lightning-sdm --help``;
* a small public face: every public module declares ``__all__`` and defines nothing public
  beyond it; the public names stay few.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sdm"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
TORCH = ("torch", "torchmetrics", *LIGHTNING)
# Modules the report side may import: the schema and the report itself.
TORCH_FREE = {"records", "keys", "report", "_messages", "_checks", "config"}
MAX_FLAT_MODULES = 12
MAX_PUBLIC_NAMES = 70


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): path
        for path in PACKAGE.rglob("*.py")
    }


def _group(module: str) -> str:
    """The room a module lives in: its folder, or itself for a flat module."""
    return module.split(".")[0]


def _runtime_imports(path: Path) -> list[str]:
    """Absolute modules imported by the file at run time (``if TYPE_CHECKING:`` excluded)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_sdm":
                found.extend(f"lightning_sdm.{alias.name}" for alias in node.names)
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def _internal(imported: str) -> str | None:
    if imported == "lightning_sdm" or not imported.startswith("lightning_sdm."):
        return None
    return imported.removeprefix("lightning_sdm.")


def _group_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        if module in ("__init__", "__main__"):
            continue  # the lazy face and `python -m`: entry points, above everything
        edges = graph.setdefault(_group(module), set())
        for imported in _runtime_imports(path):
            inner = _internal(imported)
            if inner is not None and _group(inner) != _group(module):
                edges.add(_group(inner))
    return graph


def test_the_folders_import_each_other_without_a_circle():
    graph = _group_graph()

    def visit(node: str, stack: list[str]) -> None:
        assert node not in stack, "import circle: " + " -> ".join([*stack, node])
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])

    for group in graph:
        visit(group, [])


def test_lightning_is_imported_inside_its_folder_only():
    outside = [
        f"{module} imports {imported}"
        for module, path in _modules().items()
        if _group(module) != "lightning"
        for imported in _runtime_imports(path)
        if imported.split(".")[0] in LIGHTNING
    ]
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize(
    ("group", "forbidden"),
    [
        ("actions", {"monitor", "lightning", "advice", "report"}),
        ("equilibrium", {"monitor", "actions", "lightning", "advice", "report"}),
        ("theory", {"monitor", "equilibrium", "actions", "lightning", "advice", "report"}),
        ("monitor", {"equilibrium", "actions", "lightning", "advice", "report"}),
        ("advice", {"monitor", "lightning", "report"}),
        ("invariance", {"monitor", "lightning", "report", "actions", "advice"}),
    ],
)
def test_each_stage_imports_only_the_stages_below_it(group, forbidden):
    assert not _group_graph()[group] & forbidden, _group_graph()[group] & forbidden


def test_only_the_lightning_folder_uses_it():
    users = {group for group, edges in _group_graph().items() if "lightning" in edges}
    assert users <= {"lightning"}, users


def test_the_report_side_imports_no_torch():
    offenders = []
    for module, path in _modules().items():
        if _group(module) not in TORCH_FREE:
            continue
        for imported in _runtime_imports(path):
            inner = _internal(imported)
            if imported.split(".")[0] in TORCH or (inner and _group(inner) not in TORCH_FREE):
                offenders.append(f"{module} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_few_modules_flat_at_the_top():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= MAX_FLAT_MODULES, flat


def _public_modules() -> dict[str, Path]:
    return {
        module: path
        for module, path in _modules().items()
        if not any(part.startswith("_") for part in module.split("."))
        or module.endswith("__init__")
    }


def _defined_public_names(path: Path) -> set[str]:
    """Names a module defines (not imports) at its top level, without a leading underscore."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name for name in names if not name.startswith("_")}


def test_public_modules_define_few_public_names():
    counts = {m: len(_defined_public_names(p)) for m, p in _public_modules().items()}
    assert sum(counts.values()) <= MAX_PUBLIC_NAMES, counts


@pytest.mark.parametrize("module", sorted(_public_modules()))
def test_every_public_module_declares_its_face(module):
    """httpx's ``test_exported_members``: ``__all__`` is exactly what the module offers."""
    import importlib

    name = "lightning_sdm" + (
        "" if module == "__init__" else "." + module.removesuffix(".__init__")
    )
    imported = importlib.import_module(name)
    declared = set(getattr(imported, "__all__", ()))
    assert declared, f"{name} has no __all__"
    assert all(hasattr(imported, member) for member in declared), name
    own = _defined_public_names(_modules()[module])
    assert own <= declared, f"{name} defines {sorted(own - declared)} outside __all__"
    if module.endswith("__init__") and module != "__init__":  # a folder's face: exactly __all__
        offered = {
            member
            for member, value in vars(imported).items()
            if not member.startswith("_") and not isinstance(value, type(sys))
        }
        assert offered - {"annotations"} == declared, sorted(offered ^ declared)


def _loaded_heavy_modules(code: str, cwd: Path) -> list[str]:
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys
        print(sorted(m for m in {TORCH!r} if m in sys.modules))
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
        from lightning_sdm.report import main
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
        from lightning_sdm.report import main
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


@pytest.mark.parametrize(
    "module",
    ["lightning_sdm", "lightning_sdm.records", "lightning_sdm.keys", "lightning_sdm.report"],
)
def test_importing_the_package_or_the_records_is_light(module, tmp_path):
    assert _loaded_heavy_modules(f"import {module}", tmp_path) == []


@pytest.mark.parametrize(
    "path",
    [
        "lightning_sdm.SphericalDynamicsCallback",
        "lightning_sdm.DecayLR",
        "lightning_sdm.CorrectedWeightDecay",
        "lightning_sdm.actions.DecayLR",
        "lightning_sdm.actions.Stop",
        "lightning_sdm.actions.Warn",
        "lightning_sdm.actions.rescale_for_lr_decay",
        "lightning_sdm.theory.relaxation_steps",
        "lightning_sdm.invariance.find_scale_invariant_units",
        "lightning_sdm.lightning.callbacks_factory",
        "lightning_sdm.lightning.fabric_callbacks_factory",
        "lightning_sdm.report.main",
    ],
)
def test_the_import_paths_users_write_resolve(path):
    """``class_path`` values in the README and examples, and the entry points' targets."""
    import importlib

    module, _, name = path.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_the_entry_points_name_existing_objects():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    import importlib
    import re

    targets = re.findall(r'= "(lightning_sdm[\w.]*):(\w+)"', text)
    assert len(targets) == 3, targets
    for module, name in targets:
        assert callable(getattr(importlib.import_module(module), name)), (module, name)
