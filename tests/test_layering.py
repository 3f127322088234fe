"""The layering the packages' docstrings promise, checked on the source."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The latency gate: measure, store, compare.  The sweep (perf/sweep.py) judges fidelity too and may import it.
GATE_MODULES = ("plugin", "session", "stats", "baselines", "timing", "options", "report", "compare", "roofline", "workers",
                "test_latency", "__init__")


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_gate_imports_nothing_from_fidelity():
    for name in GATE_MODULES:
        assert "fidelity" not in imported_packages(ROOT / "perf" / f"{name}.py"), name


def test_engines_import_neither_fidelity_nor_perf():
    for path in (ROOT / "engines").rglob("*.py"):
        assert not imported_packages(path) & {"fidelity", "perf"}, path


def test_nothing_imports_the_upgrade_gate():
    for package in ("engines", "fidelity", "perf"):
        for path in (ROOT / package).rglob("*.py"):
            assert "gate" not in imported_packages(path), path
