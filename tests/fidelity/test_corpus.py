import json

import pytest

from fidelity.corpus import (
    CorpusError,
    load_corpus,
    load_wikitext_datasets,
    load_wikitext_path,
    packed_batch,
    padded_batch,
    python_docs_corpus,
)


@pytest.fixture(scope="module")
def prose():
    return python_docs_corpus()


def wikitext_lines(prose, n=40):
    """Real English paragraphs in WikiText-2-raw's layout: headings, blank lines, one paragraph per line."""
    lines = [" = Python documentation = ", ""]
    for paragraph in prose.paragraphs()[:n]:
        lines += [f" {paragraph} ", ""]
    return lines


def test_bundled_prose_is_real_english_without_code(prose):
    paragraphs = prose.paragraphs()
    assert len(paragraphs) > 300 and not prose.is_wikitext
    assert all(">>>" not in p for p in paragraphs)
    assert sum(len(p) for p in paragraphs) > 100_000


def test_wikitext_layouts_load_the_same_text(tmp_path, prose):
    lines = wikitext_lines(prose)
    raw = tmp_path / "wiki.test.raw"
    raw.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet_dir = tmp_path / "wikitext-2-raw-v1"
    parquet_dir.mkdir()
    pq.write_table(pa.table({"text": lines}), parquet_dir / "test-00000-of-00001.parquet")
    loaded = [load_wikitext_path(p) for p in (raw, jsonl, parquet_dir)]
    for corpus in loaded:
        assert corpus.is_wikitext
        assert corpus.paragraphs() == [p.strip() for p in prose.paragraphs()[:40]]


def test_bad_wikitext_paths(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_wikitext_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no test split found"):
        load_wikitext_path(tmp_path / "empty")
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="'text' field"):
        load_wikitext_path(bad)


def test_offline_datasets_fall_back_with_a_reason(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    corpus, why = load_wikitext_datasets()
    assert corpus is None and "not in the local datasets cache" in why
    corpus, notes = load_corpus()
    assert corpus.name == "python-docs" and "WikiText-2 not available" in notes[0]


def test_packed_batches_are_framed_running_text(prose, tiny_bert):
    batch = packed_batch(prose, tiny_bert, batch=3, seq_len=32)
    assert batch.shape == (3, 32) and bool(batch.attention_mask.all())
    assert batch.input_ids[:, 0].tolist() == [101] * 3 and batch.input_ids[:, -1].tolist() == [102] * 3
    text = tiny_bert.tokenizer.decode(batch.input_ids[0, 1:-1])
    assert len(text.split()) > 10


def test_padded_batches_have_real_padding(prose, tiny_bert, tiny_gpt2):
    batch = padded_batch(prose, tiny_bert, batch=8, seq_len=64)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert len(set(lengths)) > 1 and max(lengths) <= 64
    gpt2_batch = packed_batch(prose, tiny_gpt2, batch=2, seq_len=16)  # no [CLS]/[SEP] framing for GPT-2
    assert 101 not in gpt2_batch.input_ids[:, 0].tolist()
