"""One table renderer for the terminal and for Markdown (tabulate), used by every report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, markdown: bool = False) -> str:
    """``rows`` under ``headers``: aligned plain text for a terminal, or a GitHub Markdown table."""
    from tabulate import tabulate

    return tabulate(
        [list(r) for r in rows],
        headers=list(headers),
        tablefmt="github" if markdown else "simple",
        disable_numparse=True,  # cells are formatted by the caller; keep them as written
    )
