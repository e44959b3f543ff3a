"""The encoder's fast paths (one-pass segment cache, walls) give exactly ``sp.encode`` ids."""

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

from data_prep.base.errors import DataPrepError
from data_prep.encoder import DocumentEncoder
from data_prep.train_tokenizer import TokenizerOptions

#: walls next to spaces, walls in runs, walls at both ends, the whitespace mark beside a wall
WALLY = [
    "\n",
    "\n\n\n",
    "a\nb",
    "a \nb",
    "a\n b",
    "a \n b",
    " \n",
    "\n ",
    "x\n\n\ny z\n",
    "\u2581\n\u2581",
    "tab\t\nnew\r\nline",
    "it\u2019s \u2019quoted\u2019 \u2019\n\u2019",
    "=" * 40 + "\n" + "=" * 40,
    "\n".join(["The cat sat.", "The dog sat.", "", "  indented", "The end"]) * 20,
]

OPTIONS = {
    "bpe-identity": TokenizerOptions(vocab_size=1000),
    "bpe-nfkc": TokenizerOptions(vocab_size=1000, normalization="nmt_nfkc", byte_fallback=False),
    # "\n\n" is matched before "\n": the newline is no wall there
    "bpe-double-newline": TokenizerOptions(vocab_size=1000, user_defined_symbols=["\n\n"]),
}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return (
        corpus_docs("python_docs", 20)
        + WALLY
        + NASTY
        + corpus_docs("shakespeare", 5, max_chars=30000)
        + corpus_docs("linux_docs", 20, max_chars=20000)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory, docs) -> dict:
    return train_models(tmp_path_factory.mktemp("tok"), docs, OPTIONS, 150)


def expected(sp, batch: list[str]) -> tuple[list[int], list[int]]:
    want = [sp.encode(d) + [sp.eos_id()] if sp.encode(d) else [] for d in batch]
    return [t for w in want for t in w], [len(w) for w in want]


def test_walls_found_where_no_merge_reaches(models):
    enc = DocumentEncoder(models["bpe-identity"])
    assert enc.fast and "\n" in enc._wall_ids  # data_prep's user-defined newline piece
    assert "\n" not in DocumentEncoder(models["bpe-double-newline"])._wall_ids
    pieces = [enc.sp.id_to_piece(i) for i in range(enc.sp.get_piece_size())]
    for wall in enc._wall_ids:
        assert not any(wall in p for p in pieces if p != wall)  # \n: user-defined, alone anyway


@pytest.mark.parametrize("kind", list(OPTIONS))
@pytest.mark.parametrize("max_cache", [300, 2_000_000])  # 300: the cache restarts mid-way
def test_fast_encoder_equals_sp_encode(docs, models, kind, max_cache):
    enc = DocumentEncoder(models[kind], max_cache=max_cache)
    assert enc.fast, enc.blocker
    sp = spm.SentencePieceProcessor(model_file=str(models[kind]))
    for start in range(0, len(docs), 23):
        batch = docs[start : start + 23]
        ids, lens = enc.encode(batch)
        want_ids, want_lens = expected(sp, batch)
        assert lens.tolist() == want_lens
        assert ids.tolist() == want_ids
    ids, _ = enc.encode(docs)  # a second pass from a warm cache
    assert ids.tolist() == expected(sp, docs)[0]
    assert enc.fast  # never fell back


def test_bad_unicode_names_the_document_and_leaves_the_cache_usable(models):
    enc = DocumentEncoder(models["bpe-identity"])
    sp = enc.sp
    with pytest.raises(DataPrepError, match="document 1 of the batch"):
        enc.encode(["fine words here", "lone \ud800 surrogate with new words"])
    batch = ["fine words here", "lone surrogate with new words"]
    assert enc.encode(batch)[0].tolist() == expected(sp, batch)[0]


def test_tokenize_files_are_byte_identical_to_the_reference(tmp_path, docs, models):
    stats, _sp = tokenize_like_megatron(tmp_path, docs, models["bpe-identity"], shard_chars=100_000)
    written = (tmp_path / "out" / "mix_text_document.bin").read_bytes()
    assert np.frombuffer(written, np.uint16).size == stats["tokens"]
