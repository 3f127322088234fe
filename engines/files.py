"""The one atomic-write helper: reports, cache manifests, indexes and policy files are written through it.

Write-then-rename in the target's folder: a crash or Ctrl-C mid-write leaves the
previous file intact, never half of a new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, **dump_kwargs: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, **{"indent": 2, **dump_kwargs}) + "\n")


def write_or_print(text: str, path: Path | None) -> None:
    """A command's output: to ``path`` (atomically) when given, else to stdout."""
    import sys

    if path is not None:
        atomic_write_text(path, text)
    else:
        sys.stdout.write(text)
