"""Indexed datasets: byte-identical to Megatron-LM preprocess_data.py, read by megatron-core."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
from workers.data_prep_common import (
    NASTY,
    corpus_docs,
    tokenize_like_megatron,
    train_models,
)

from data_prep.encoder import DocumentEncoder
from data_prep.indexed import optimal_dtype, read_index, write_dataset
from data_prep.train_tokenizer import TokenizerOptions

TOKENIZERS = {
    "bpe-identity": TokenizerOptions(model_type="bpe", vocab_size=1000),
    "bpe-nfkc": TokenizerOptions(
        model_type="bpe", vocab_size=1000, normalization="nmt_nfkc", byte_fallback=False
    ),
    "unigram-identity": TokenizerOptions(model_type="unigram", vocab_size=1000),
}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return (
        corpus_docs("python_docs", 30)
        + NASTY
        + corpus_docs("wiki_vital", 300)
        + corpus_docs("kjv", 3)
        + corpus_docs("linux_docs", 40, max_chars=20000)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory, docs) -> dict:
    return train_models(tmp_path_factory.mktemp("tok"), docs, TOKENIZERS, 200)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_files_equal_megatron_preprocess_output_and_read_back(tmp_path, docs, models, kind):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    stats, sp = tokenize_like_megatron(tmp_path, docs, models[kind], shard_chars=300_000)
    prefix = tmp_path / "out" / "mix_text_document"

    ds = IndexedDataset(str(prefix))
    eod = sp.eos_id()
    expected = [sp.encode(d) + [eod] for d in docs if sp.encode(d)]
    assert len(ds) == len(expected) == stats["sequences"]
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds.document_indices.tolist() == read_index(f"{prefix}.idx").doc_idx.tolist()
    assert stats["documents"] == len(docs)
    assert stats["tokens"] == sum(map(len, expected))
    assert stats["text_bytes"] == sum(len(d.encode()) for d in docs)


@pytest.mark.parametrize("kind", ["bpe-identity", "bpe-nfkc"])
def test_segment_cache_is_exact(docs, models, kind):
    fast = DocumentEncoder(models[kind], max_cache=5000)  # small: the cache restarts mid-way
    assert fast.fast, fast.blocker
    sp = spm.SentencePieceProcessor(model_file=str(models[kind]))
    batches = [docs[i : i + 37] for i in range(0, len(docs), 37)]
    for batch in batches:
        ids, lens = fast.encode(batch)
        want = [sp.encode(d) + [sp.eos_id()] if sp.encode(d) else [] for d in batch]
        assert lens.tolist() == [len(w) for w in want]
        assert ids.tolist() == [t for w in want for t in w]


def test_unigram_is_encoded_whole_and_exact(docs, models):
    enc = DocumentEncoder(models["unigram-identity"])
    assert not enc.fast and "not BPE" in enc.blocker
    sp = enc.sp
    ids, _ = enc.encode(docs)
    assert ids.tolist() == [t for d in docs if sp.encode(d) for t in sp.encode(d) + [sp.eos_id()]]


def test_large_vocabularies_use_int32(tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32
    assert all(optimal_dtype(v) == DType.optimal_dtype(v) for v in (100, 65499, 65500, 10**6))
    tokens = np.array([70000, 5, 2, 65536, 2], dtype=np.int64)
    write_dataset(tmp_path / "big", tokens, np.array([3, 0, 2]), optimal_dtype(100_000))
    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds.index.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == [[70000, 5, 2], [65536, 2]]
    assert ds.document_indices.tolist() == [0, 1, 1, 2]
