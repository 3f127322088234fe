"""Natural text for fidelity runs: WikiText-2 where it can be had, real English prose otherwise.

Sources, in order:

1. ``--wikitext-path PATH``: a local copy in WikiText-2's layout: a ``.parquet``
   file with a ``text`` column (the Hugging Face layout, ``wikitext-2-raw-v1/test-*.parquet``),
   a ``.json``/``.jsonl`` file of ``{"text": ...}`` records, a raw text file
   (``wiki.test.raw``), or a directory holding one of these for the test split.
2. ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")``, from the
   hub or the local datasets cache (only the cache when ``HF_HUB_OFFLINE=1``).
3. The Python documentation that ships with every CPython (``pydoc_data.topics``):
   human-written English prose, with its code samples removed.  Not WikiText, and
   every report line that used it says so.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from engines.batch import TokenBatch
from engines.models import LoadedModel, hub_offline, hub_reachable

WIKITEXT_DATASET = ("wikitext", "wikitext-2-raw-v1")
WIKITEXT_SPLIT = "test"
_SPLIT_FILE_PATTERNS = ("test-*.parquet", "*test*.parquet", "wiki.test.raw", "*test*.jsonl", "*test*.json", "*test*.txt")


class CorpusError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    name: str  # short label used in report lines
    origin: str  # where exactly the text came from
    lines: tuple[str, ...]
    is_wikitext: bool

    def paragraphs(self) -> list[str]:
        """Non-empty, non-heading lines (WikiText puts one paragraph per line)."""
        return [line.strip() for line in self.lines if line.strip() and not _is_heading(line)]


def _is_heading(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith("=") and stripped.endswith("=")


# --- local files ------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """The text lines of one local file; any file that is not what its suffix says is a CorpusError naming it."""
    try:
        return _read_lines_unchecked(path)
    except CorpusError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorpusError(
            f"--wikitext-path {path} cannot be read as {path.suffix.lstrip('.') or 'raw text'} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); point it at WikiText-2's "
            "test split: test-*.parquet (a 'text' column), JSON lines of {\"text\": ...}, or wiki.test.raw"
        ) from None


def _read_lines_unchecked(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise CorpusError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends for a bad file
            raise ValueError(str(exc)) from None
        if "text" not in table.column_names:
            raise CorpusError(f"{path} has columns {table.column_names}; WikiText's layout has a 'text' column")
        return [str(t) for t in table.column("text").to_pylist()]
    if suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        if suffix == ".json" and raw.lstrip().startswith("["):
            records = json.loads(raw)
        else:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        try:
            return [str(r["text"]) for r in records]
        except (KeyError, TypeError) as exc:
            raise CorpusError(f"{path}: every record must be an object with a 'text' field") from exc
    return path.read_text(encoding="utf-8").splitlines()


def load_wikitext_path(path: Path) -> TextCorpus:
    path = Path(path).expanduser()
    if path.is_dir():
        for pattern in _SPLIT_FILE_PATTERNS:
            matches = sorted(path.rglob(pattern))
            if matches:
                files = matches
                break
        else:
            raise CorpusError(
                f"--wikitext-path {path}: no test split found (looked for {', '.join(_SPLIT_FILE_PATTERNS)}). "
                "Point it at wikitext-2-raw-v1/test-*.parquet or wiki.test.raw."
            )
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(
            f"--wikitext-path {path} does not exist: give a WikiText-2 folder or file (parquet, json/jsonl or raw "
            "text such as wiki.test.raw), or leave the option out to use the bundled prose"
        )
    lines = [line for f in files for line in _read_lines(f)]
    if not any(line.strip() for line in lines):
        raise CorpusError(f"--wikitext-path {path}: the files hold no text")
    return TextCorpus(name="wikitext-2 (local)", origin=", ".join(str(f) for f in files), lines=tuple(lines), is_wikitext=True)


# --- datasets hub ------------------------------------------------------------------


def load_wikitext_datasets() -> tuple[TextCorpus | None, str]:
    """WikiText-2 through ``datasets``; ``(None, why)`` when it cannot be had quickly."""
    try:
        import datasets
    except ImportError:
        return None, "the datasets package is not installed (pip install datasets)"
    if not hub_offline() and not hub_reachable():
        return None, "the Hugging Face hub is unreachable and HF_HUB_OFFLINE is not set"
    try:
        dataset = datasets.load_dataset(*WIKITEXT_DATASET, split=WIKITEXT_SPLIT)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; each means "not available"
        where = "the local datasets cache (HF_HUB_OFFLINE=1)" if hub_offline() else "the hub"
        return None, f"{'/'.join(WIKITEXT_DATASET)} is not in {where}: {type(exc).__name__}"
    lines = tuple(str(t) for t in dataset["text"])
    return TextCorpus(
        name="wikitext-2",
        origin=f"datasets.load_dataset{WIKITEXT_DATASET + (WIKITEXT_SPLIT,)}",
        lines=lines,
        is_wikitext=True,
    ), ""


# --- bundled fallback ----------------------------------------------------------------

_CODE_LINE = re.compile(r"^\s{3,}|^\s*(>>>|\.\.\.|\$ |[{}\[\]()#@])")


def python_docs_corpus() -> TextCorpus:
    """English prose from CPython's bundled documentation, code samples removed."""
    from pydoc_data import topics

    paragraphs: list[str] = []
    for key in sorted(topics.topics):
        for block in re.split(r"\n\s*\n", topics.topics[key]):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines or any(_CODE_LINE.match(ln) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            words = text.split()
            letters = sum(ch.isalpha() or ch.isspace() for ch in text)
            # Prose: a real sentence or more, mostly letters.
            if len(words) >= 12 and letters / len(text) > 0.85 and text.rstrip().endswith((".", ":", ")")):
                paragraphs.append(text)
    return TextCorpus(
        name="python-docs",
        origin="CPython stdlib pydoc_data.topics, prose paragraphs only",
        lines=tuple(paragraphs),
        is_wikitext=False,
    )


def load_corpus(wikitext_path: Path | None = None) -> tuple[TextCorpus, list[str]]:
    """The best natural text available, and notes on what was not."""
    notes: list[str] = []
    if wikitext_path is not None:
        return load_wikitext_path(wikitext_path), notes
    corpus, why = load_wikitext_datasets()
    if corpus is not None:
        return corpus, notes
    notes.append(f"WikiText-2 not available ({why}); using CPython's bundled documentation prose instead")
    return python_docs_corpus(), notes


# --- batching ------------------------------------------------------------------------


def _require_tokenizer(model: LoadedModel) -> None:
    if model.tokenizer is None:
        raise CorpusError(f"{model.name} has no tokenizer, so natural text cannot be fed to it ({model.tokenizer_source})")


def _token_stream(model: LoadedModel, paragraphs: Iterable[str], limit: int) -> list[int]:
    tokenizer = model.tokenizer
    stream: list[int] = []
    for paragraph in paragraphs:
        stream.extend(tokenizer(paragraph, add_special_tokens=False)["input_ids"])
        if len(stream) >= limit:
            break
    return stream


def _framing(model: LoadedModel) -> tuple[list[int], list[int]]:
    """BERT inputs carry [CLS] ... [SEP]; GPT-2 text is fed as is."""
    tokenizer = model.tokenizer
    if model.spec.family == "bert" and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return [int(tokenizer.cls_token_id)], [int(tokenizer.sep_token_id)]
    return [], []


def packed_batch(corpus: TextCorpus, model: LoadedModel, *, batch: int, seq_len: int) -> TokenBatch:
    """Consecutive windows of running text, every position valid (no padding)."""
    _require_tokenizer(model)
    head, tail = _framing(model)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise CorpusError(f"sequence length {seq_len} leaves no room for text after special tokens")
    stream = _token_stream(model, corpus.paragraphs(), batch * body)
    if len(stream) < batch * body:
        # A small corpus is cycled rather than padded: every position stays real text.
        if not stream:
            raise CorpusError(f"corpus {corpus.name} tokenized to nothing")
        stream = (stream * (batch * body // len(stream) + 1))[: batch * body]
    rows = [head + stream[i * body : (i + 1) * body] + tail for i in range(batch)]
    ids = torch.tensor(rows, dtype=torch.int64)
    return TokenBatch(ids, torch.ones_like(ids), source=f"{corpus.name} packed b{batch}s{seq_len}")


def padded_batch(corpus: TextCorpus, model: LoadedModel, *, batch: int, seq_len: int) -> TokenBatch:
    """One paragraph per row, truncated to ``seq_len`` and right-padded: real padding patterns."""
    _require_tokenizer(model)
    head, tail = _framing(model)
    body = seq_len - len(head) - len(tail)
    paragraphs = corpus.paragraphs()
    if not paragraphs:
        raise CorpusError(f"corpus {corpus.name} has no paragraphs")
    ids = torch.full((batch, seq_len), model.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((batch, seq_len), dtype=torch.int64)
    for row in range(batch):
        # Spread the rows over the corpus so that lengths vary.
        paragraph = paragraphs[(row * 7919) % len(paragraphs)]
        tokens = model.tokenizer(paragraph, add_special_tokens=False)["input_ids"][:body]
        sequence = head + tokens + tail
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.int64)
        mask[row, : len(sequence)] = 1
    return TokenBatch(ids, mask, source=f"{corpus.name} padded b{batch}s{seq_len}")
