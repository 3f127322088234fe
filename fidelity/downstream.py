"""Downstream agreement: does a precision change what the model's output is used for?

* **SST-2** (sentence, label): read from a local file in SST-2's schema (GLUE's TSV with a
  ``sentence``/``label`` header, or a parquet with those columns, as ``datasets`` caches
  ``glue/sst2``), else ``datasets.load_dataset("glue", "sst2")`` where it is reachable or
  cached, else the few sentences this package ships (``fidelity/data/sst2-sample.tsv``).
  With a fine-tuned sequence-classification checkpoint (``--model-path NAME=DIR`` of a
  ``BertForSequenceClassification`` directory and ``--classifier``), **accuracy** per
  precision: the checkpoint's own pooler and classifier (:class:`ClassifierHead`, read from
  its safetensors) applied in FP64 to the engine's encoder output, against the gold labels,
  beside FP32's.  Always, the labels of a fixed, seeded two-class linear head on the
  mean-pooled output are compared between the engine and FP32 (*label agreement*:
  decision flips, whatever the head means).
* **Sentence embeddings** (BERT family; minilm is trained for it): top-1 nearest-neighbour
  agreement and the Spearman rank correlation of all pairwise cosine similarities, engine
  against FP32, over the sentences.
* **Next-token** (GPT-2): top-1 agreement and mean KL(FP32 || engine) of the next-token
  distributions over valid positions; with weights from a checkpoint (``--model-path``),
  also **perplexity** per precision on natural text (WikiText-2 where given, else the bundled
  prose): exp of the mean next-token NLL over valid positions (:func:`perplexity`).  Random-init
  and stress weights get no perplexity: of random weights it says nothing about the language.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import torch

from engines.batch import TokenBatch

SAMPLE_SST2 = Path(__file__).resolve().parent / "data" / "sst2-sample.tsv"
HEAD_SEED = 20261126


class DownstreamDataError(ValueError):
    """A labelled-sentences file that is not in SST-2's schema; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Sentences:
    name: str
    texts: list[str]
    labels: list[int]


def _check(path: Path, texts: list, labels: list) -> Sentences:
    if not texts:
        raise DownstreamDataError(f"{path}: no sentences")
    bad = [label for label in labels if label not in (0, 1)]
    if bad:
        raise DownstreamDataError(f"{path}: labels must be 0 or 1 (SST-2), found {bad[:3]}")
    return Sentences(str(path), [str(t) for t in texts], [int(label) for label in labels])


def load_sst2_file(path: Path) -> Sentences:
    """A TSV with a sentence/label header (GLUE) or a parquet with sentence and label columns."""
    path = Path(path)
    if not path.is_file():
        raise DownstreamDataError(f"{path} does not exist: give an SST-2 file (GLUE's dev.tsv, or a parquet with "
                                  "sentence and label columns)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"sentence", "label"} - set(table.column_names)
        if missing:
            raise DownstreamDataError(f"{path}: no column(s) {sorted(missing)}; SST-2 has sentence and label")
        return _check(path, table.column("sentence").to_pylist(), table.column("label").to_pylist())
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"sentence", "label"} <= set(reader.fieldnames):
            raise DownstreamDataError(f"{path}: the header must name sentence and label (tab-separated), "
                                      f"found {reader.fieldnames}")
        rows = list(reader)
    try:
        return _check(path, [r["sentence"] for r in rows], [int(r["label"]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise DownstreamDataError(f"{path}: a label is not an integer ({exc})") from None


def load_sst2(path: Path | None = None) -> tuple[Sentences, str]:
    """The sentences and a note saying where they came from."""
    if path is not None:
        return load_sst2_file(path), f"SST-2 from {path}"
    try:
        from datasets import load_dataset

        split = load_dataset("glue", "sst2", split="validation")
        return Sentences("glue/sst2 validation", list(split["sentence"]), list(split["label"])), "SST-2 (datasets)"
    except Exception as exc:  # noqa: BLE001 - offline, not cached, or datasets missing: the shipped sample
        reason = f"{type(exc).__name__}"
    return load_sst2_file(SAMPLE_SST2), f"SST-2 not reachable ({reason}): the {SAMPLE_SST2.name} sample shipped here"


def encode(model, texts: list[str], *, max_len: int = 64) -> TokenBatch:
    if model.tokenizer is None:
        raise DownstreamDataError(f"{model.name} has no tokenizer here: sentences cannot be encoded")
    encoded = model.tokenizer(texts, padding="max_length", truncation=True, max_length=min(max_len, model.max_positions),
                              return_tensors="pt")
    return TokenBatch(encoded["input_ids"], encoded["attention_mask"], f"{len(texts)} sentences")


def _pooled(output: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    mask = batch.attention_mask.to(output.device)[..., None].to(output.dtype)
    return (output * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """A fine-tuned BERT sequence classifier's head: pooler (dense + tanh on the first token) and classifier."""

    pooler_weight: torch.Tensor
    pooler_bias: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    source: str

    KEYS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias")

    @classmethod
    def load(cls, folder: Path) -> ClassifierHead:
        """From a ``BertForSequenceClassification`` directory's safetensors; refused unless it has a 2-label head."""
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        found: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in cls.KEYS if key in handle.keys()})
        missing = [key for key in cls.KEYS if key not in found]
        if missing:
            raise DownstreamDataError(
                f"--classifier: {folder} has no {', '.join(missing)}: give the directory of a fine-tuned "
                "BertForSequenceClassification (save_pretrained with safetensors) as --model-path NAME=DIR")
        if found["classifier.weight"].shape[0] != 2:
            raise DownstreamDataError(f"--classifier: {folder} has {found['classifier.weight'].shape[0]} labels; "
                                      "SST-2 has 2")
        return cls(*(found[key].double() for key in cls.KEYS), source=str(folder))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(hidden[:, 0].double().cpu() @ self.pooler_weight.T + self.pooler_bias)
        return pooled @ self.weight.T + self.bias

    def accuracy(self, hidden: torch.Tensor, labels: list[int]) -> float:
        return float((self.logits(hidden).argmax(1) == torch.tensor(labels)).double().mean())


def perplexity(logits: torch.Tensor, batch: TokenBatch) -> float:
    """exp(mean NLL) of each next token given the ones before, over pairs of valid positions."""
    log_p = torch.log_softmax(logits.double().cpu()[:, :-1], -1)
    target = batch.input_ids[:, 1:]
    valid = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
    nll = -log_p.gather(-1, target[..., None])[..., 0]
    return float(torch.exp(nll[valid].mean()))


@dataclasses.dataclass(frozen=True)
class Agreement:
    engine: str
    label_agreement: float  # seeded two-class head on the mean-pooled output
    nearest_neighbour_agreement: float | None
    similarity_spearman: float | None
    next_token_agreement: float | None = None
    mean_kl: float | None = None
    accuracy: float | None = None  # with a fine-tuned classifier's head (ClassifierHead), against the gold labels
    perplexity: float | None = None  # GPT-2 with checkpoint weights, on natural text


def agreement(engine, reference_output: torch.Tensor, batch: TokenBatch, *, causal: bool,
              output: torch.Tensor | None = None) -> Agreement:
    """``engine`` on ``batch`` against the FP32 reference's output for it (computed once by the caller); ``output``:
    the engine's own output on ``batch``, where the caller has it already."""
    from scipy.stats import spearmanr

    out = (engine.infer(batch) if output is None else output).double().cpu()
    ref = reference_output.double().cpu()
    pooled_out, pooled_ref = _pooled(out, batch), _pooled(ref, batch)
    head = torch.randn(pooled_ref.shape[1], 2, generator=torch.Generator().manual_seed(HEAD_SEED), dtype=torch.float64)
    labels = (pooled_out @ head).argmax(1) == (pooled_ref @ head).argmax(1)
    result = {"label_agreement": float(labels.double().mean())}
    if causal:
        valid = batch.attention_mask.bool()
        log_p, log_q = torch.log_softmax(ref, -1)[valid], torch.log_softmax(out, -1)[valid]
        result["next_token_agreement"] = float((log_p.argmax(-1) == log_q.argmax(-1)).double().mean())
        result["mean_kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        result.update(nearest_neighbour_agreement=None, similarity_spearman=None)
    else:
        def sims(x):
            x = torch.nn.functional.normalize(x, dim=1)
            s = x @ x.T
            return s.fill_diagonal_(-math.inf)

        s_out, s_ref = sims(pooled_out), sims(pooled_ref)
        result["nearest_neighbour_agreement"] = float((s_out.argmax(1) == s_ref.argmax(1)).double().mean())
        upper = torch.triu_indices(len(s_ref), len(s_ref), offset=1)
        rho = spearmanr(s_out[upper[0], upper[1]].numpy(), s_ref[upper[0], upper[1]].numpy()).statistic
        result["similarity_spearman"] = float(rho)
    return Agreement(engine.name, **result)
