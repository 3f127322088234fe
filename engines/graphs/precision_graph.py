"""FP32 exports and precision graphs, built once and kept in the engine cache.

Every ONNX-based backend (onnxruntime, the torch ONNX executor, TensorRT) starts
from :func:`precision_graph`: the same file for the same model and policy, so a
difference between backends is a difference between runtimes, not between graphs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from engines.cache import CacheEntry, EngineCache
from engines.graphs.export import GRAPH_FILE, export_fp32, export_key, load_graph, save_graph
from engines.models import LoadedModel
from engines.precision.audit import PrecisionAudit
from engines.precision.onnx_convert import CONVERTER_VERSION, audit_graph, check_graph_policy, convert_graph
from engines.precision.policy import PrecisionPolicy

DTYPES_FILE = "dtypes.json"


@dataclasses.dataclass(frozen=True)
class PrecisionGraph:
    path: Path  # the .onnx file
    digest: str  # sha256 over graph + external data: the key of anything built from it
    dtypes: dict  # {op_type: {dtype: count}} as verified after conversion
    policy: str


def fp32_graph(model: LoadedModel, cache: EngineCache) -> CacheEntry:
    """The model's FP32 ONNX graph in the cache: this suite's verified export, or a user's graph (--onnx) copied in."""
    if model.graph is not None:
        from engines.graphs.user_graph import copy_graph

        fields = {"artifact": "onnx-user", "model": model.name, "sha256": model.graph.sha256}
        return cache.get_or_build(
            fields, lambda folder: copy_graph(model.graph.path, folder), description=f"{model.name} user ONNX graph"
        )
    fields = export_key(model)
    return cache.get_or_build(fields, lambda folder: export_fp32(model, folder), description=f"{model.name} FP32 ONNX export")


def precision_graph(model: LoadedModel, policy: PrecisionPolicy, cache: EngineCache) -> PrecisionGraph:
    """The policy's graph for ``model``: exported, converted, verified, cached."""
    import onnx

    source = fp32_graph(model, cache)
    source_digest = _digest_of(source)
    fields = {
        "artifact": "onnx-precision",
        "model": model.name,
        "policy": policy.name,
        "policy_fingerprint": policy.fingerprint,
        "source_export": source.key,
        "converter": CONVERTER_VERSION,
        "onnx": onnx.__version__,
    }

    def build(folder: Path) -> None:
        fp32 = load_graph(source.file(GRAPH_FILE))
        converted, stats = convert_graph(fp32, policy)
        dtypes = check_graph_policy(converted, policy)
        save_graph(converted, folder)
        (folder / DTYPES_FILE).write_text(
            json.dumps({"dtypes": dtypes, "stats": dataclasses.asdict(stats), "source_digest": source_digest}, indent=2)
        )

    entry = cache.get_or_build(fields, build, description=f"{model.name} {policy.name} precision graph")
    info = json.loads(entry.file(DTYPES_FILE).read_text())
    return PrecisionGraph(entry.file(GRAPH_FILE), _digest_of(entry), info["dtypes"], policy.name)


def _digest_of(entry: CacheEntry) -> str:
    """sha256 over the checksums of the graph's files (graph + external data), from the manifest."""
    manifest = json.loads((entry.path / "manifest.json").read_text())
    graph_files = {k: v["sha256"] for k, v in manifest["files"].items() if k.startswith(GRAPH_FILE)}
    return hashlib.sha256(json.dumps(graph_files, sort_keys=True).encode()).hexdigest()


def verified_audit(graph: PrecisionGraph, policy: PrecisionPolicy, *, engine: str) -> PrecisionAudit:
    """Re-read a (possibly cached) precision graph and prove its dtypes again: the ONNX engines' audit."""
    import onnx

    return audit_graph(onnx.load(str(graph.path), load_external_data=False), policy, engine=engine)
