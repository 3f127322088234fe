"""Export a registered model to FP32 ONNX, and check the export against PyTorch.

The exported module is :class:`engines.models.OutputForward` around the
unmodified transformers model with eager attention: ``(input_ids,
attention_mask) -> output``, int64 inputs, dynamic batch and sequence axes,
``use_cache=False`` for GPT-2.  The dynamo exporter needs opset >= 18 (its
conversion down to 17 breaks GPT-2's ``Split``) and writes the weights as
external data next to the graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from engines.batch import TokenBatch
from engines.models import LoadedModel
from engines.perturb import PERTURBED_MARK
from engines.workers import onnxruntime_session_options

ONNX_OPSET = 18
GRAPH_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "output"
# The exported graph must match PyTorch FP32 this closely on the check batch:
# both are FP32 with different kernels, so only summation order differs.
EXPORT_COSINE_MIN = 0.999999
EXPORT_MAX_ABS = 1e-3


class ExportError(RuntimeError):
    """The export failed or does not reproduce the PyTorch model."""


def _weights_identity(model: LoadedModel) -> dict:
    """What makes these weights these weights, cheaply: files by size and mtime, or the init seed."""
    source, _, perturbed = model.weights_source.partition(PERTURBED_MARK)
    identity = _source_identity(model, source)
    if perturbed:  # an injected fault (engines.perturb): other weights, another key
        identity["perturbed"] = perturbed
    return identity


def _source_identity(model: LoadedModel, source: str) -> dict:
    kind, _, where = source.partition(":")
    if kind in ("local", "package"):
        folder = Path(where) if kind == "local" else None
        if folder is None:
            from engines.models import package_model_dir

            folder = package_model_dir(model.spec)
        files = sorted(folder.glob("*.safetensors")) if folder else []
        return {"source": source, "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    # random-init and hub: the init seed / hub id plus the config determine them
    return {"source": source, "config": model.module.config.to_json_string(use_diff=False)}


def export_key(model: LoadedModel) -> dict:
    """The cache key fields of an FP32 export."""
    return {
        "artifact": "onnx-fp32",
        "model": model.name,
        "weights": hashlib.sha256(json.dumps(_weights_identity(model), sort_keys=True).encode()).hexdigest(),
        "torch": torch.__version__,
        "opset": ONNX_OPSET,
    }


def check_batch(model: LoadedModel) -> TokenBatch:
    """A padded batch of two shapes' worth of tokens used to verify exports."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = model.pad_token_id
    return TokenBatch(ids, mask, source="export check")


def export_fp32(model: LoadedModel, folder: Path) -> Path:
    """Write ``folder/model.onnx`` (+ external data) for ``model`` in FP32."""
    from engines.models import reference_forward

    folder.mkdir(parents=True, exist_ok=True)
    forward = reference_forward(model)
    example = check_batch(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=2, max=model.max_positions)
    path = folder / GRAPH_FILE
    try:
        torch.onnx.export(
            forward,
            (example.input_ids, example.attention_mask),
            str(path),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
            external_data=True,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean the same to the user
        raise ExportError(f"{model.name}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    verify_export(model, path, forward=forward)
    return path


def verify_export(model: LoadedModel, path: Path, *, forward=None) -> float:
    """Run the exported graph in onnxruntime (CPU) and compare with PyTorch FP32; return the cosine."""
    import onnxruntime as ort

    from engines.models import reference_forward

    if forward is None:
        forward = reference_forward(model)
    batch = check_batch(model)
    options = onnxruntime_session_options(ort)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(
        session.run(None, {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()})[0]
    )
    with torch.inference_mode():
        want = forward(batch.input_ids, batch.attention_mask).float()
    valid = batch.attention_mask.bool()
    got, want = got[valid].double(), want[valid].double()
    max_abs = float((got - want).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    if not (cosine >= EXPORT_COSINE_MIN and max_abs <= EXPORT_MAX_ABS):
        raise ExportError(
            f"{model.name}: the ONNX export at {path} does not match PyTorch FP32 "
            f"(cosine {cosine:.9f} < {EXPORT_COSINE_MIN} or max abs error {max_abs:.3g} > {EXPORT_MAX_ABS}); "
            "do not use it. Check the exporter version (torch " + torch.__version__ + ")."
        )
    return cosine


def save_graph(graph, folder: Path) -> Path:
    """``graph`` saved as ``folder/model.onnx``, its tensors in one external-data file beside it (the cache's layout)."""
    import onnx

    path = folder / GRAPH_FILE
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{GRAPH_FILE}.data", size_threshold=1024)
    return path


def load_graph(path: Path):
    """Load an ONNX file with its external data; a corrupt file is a clear error."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=True)
        onnx.checker.check_model(graph, full_check=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker errors alike
        raise ExportError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc}); delete it and re-export") from exc
    return graph
