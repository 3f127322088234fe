"""The fidelity suite's options, declared once (the engine options are engines.options')."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from engines.options import EngineSelection, Option, OptionError, check_creatable, parse_list
from fidelity.strategies import INPUT_PROFILES, InputProfile

FIDELITY_OPTIONS: tuple[Option, ...] = (
    Option(
        "--cosine-min",
        "one per-sample cosine bar for every precision",
        kind="float",
        default_text="the tolerance table: hybrid/fp16 0.9998, fp32 0.999999, bf16 0.999",
    ),
    Option(
        "--gate-precisions",
        "precisions whose results fail tests when below the bar (the others are measured and reported)",
        kind="list",
        default_text="fp32, hybrid and every policy file that does not say gated = false",
    ),
    Option("--fidelity-report", "write the results as JSON to PATH (rewritten as results arrive)", metavar="PATH"),
    Option(
        "--input-profile",
        "input sizes and example counts: "
        + "; ".join(f"{p.name}: {p.max_examples} examples, batch <= {p.max_batch}, seq <= {p.max_seq or 'model max'}"
                    for p in INPUT_PROFILES.values()),
        choices=tuple(INPUT_PROFILES),
        default_text="$FIDELITY_PROFILE, else 'ci' under CI, else 'dev'",
    ),
    Option(
        "--wikitext-path",
        "local WikiText-2 test split (parquet, json/jsonl or raw text), read at start-up",
        metavar="PATH",
    ),
)


@dataclasses.dataclass
class FidelityOptions:
    cosine_min: float | None
    gate_precisions: list[str]
    report_path: Path | None
    profile: InputProfile
    wikitext_path: Path | None

    @classmethod
    def from_values(cls, values: dict[str, Any], selection: EngineSelection) -> "FidelityOptions":
        cosine_min = values.get("cosine_min")
        if cosine_min is not None and not 0.0 < cosine_min <= 1.0:
            raise OptionError(f"--cosine-min must be in (0, 1], got {cosine_min}")
        default_gate = [name for name, policy in selection.policies.items() if policy.gated_by_default]
        gate = parse_list(values.get("gate_precisions"), flag="--gate-precisions", default=default_gate)
        unknown = [name for name in gate if name not in selection.policies]
        if unknown:
            raise OptionError(
                f"--gate-precisions names {', '.join(unknown)}, which --precisions does not select "
                f"({', '.join(selection.policies)}); gate only precisions that run"
            )
        profile_name = values.get("input_profile") or os.environ.get("FIDELITY_PROFILE") or (
            "ci" if os.environ.get("CI") else "dev"
        )
        if profile_name not in INPUT_PROFILES:
            raise OptionError(
                f"unknown input profile {profile_name!r} (from --input-profile or $FIDELITY_PROFILE); "
                f"known: {', '.join(INPUT_PROFILES)}"
            )
        return cls(
            cosine_min=cosine_min,
            gate_precisions=gate,
            report_path=check_report_path(values.get("fidelity_report")),
            profile=INPUT_PROFILES[profile_name],
            wikitext_path=Path(values["wikitext_path"]).expanduser() if values.get("wikitext_path") else None,
        )

    def record(self) -> dict[str, Any]:
        return {
            "cosine_min": self.cosine_min,
            "gate_precisions": self.gate_precisions,
            "profile": self.profile.name,
            "wikitext_path": None if self.wikitext_path is None else str(self.wikitext_path),
        }


def check_report_path(value: str | None) -> Path | None:
    """A report file path: not an existing folder, in a folder that exists or can be created."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise OptionError(
            f"--fidelity-report {path} is a folder; give a file path such as {path / 'fidelity-report.json'}"
        )
    return check_creatable(path, source="--fidelity-report", fix="choose a writable folder")
