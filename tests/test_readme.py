"""The README's option, policy and sweep-claims tables are generated from the code's tables and the committed data."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _options(module: str, table: str) -> str:
    import importlib

    from engines.options import options_markdown

    return options_markdown(getattr(importlib.import_module(module), table))


def _policies() -> str:
    from engines.precision.policy import policies_markdown

    return policies_markdown()


def _sweep_claims() -> str:
    from engines.tables import render_table
    from perf.sweep_report import claims, read_csv

    csv = Path(__file__).resolve().parents[1] / "docs" / "results" / "sweep-h100" / "warm" / "sweep.csv"
    return render_table(("claim", "published", "measured here", "verdict"), claims(read_csv(csv)), markdown=True)


GENERATED = {
    "engine-options": lambda: _options("engines.options", "ENGINE_OPTIONS"),
    "fidelity-options": lambda: _options("fidelity.options", "FIDELITY_OPTIONS"),
    "perf-options": lambda: _options("perf.options", "PERF_OPTIONS"),
    "policies": _policies,
    "sweep-claims": _sweep_claims,
}


def generated_blocks(text: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"<!-- generated: ([\w-]+) -->\n(.*?)<!-- end -->", text, flags=re.S)
    }


def refresh(text: str) -> str:
    """The README with every generated block rewritten from the code (run this module to apply it)."""
    for name, make in GENERATED.items():
        text = re.sub(
            rf"(<!-- generated: {name} -->\n).*?(<!-- end -->)",
            lambda m: m.group(1) + make() + "\n" + m.group(2),
            text,
            flags=re.S,
        )
    return text


def test_the_readme_tables_are_the_code_tables():
    blocks = generated_blocks(README.read_text())
    assert set(blocks) == set(GENERATED)
    for name, make in GENERATED.items():
        assert blocks[name] == make().strip(), f"README block {name!r} is stale: run `python tests/test_readme.py`"


if __name__ == "__main__":
    # Run as a script, tests/ comes first on sys.path, and tests/engines would shadow the package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(README.parent))
    README.write_text(refresh(README.read_text()))
