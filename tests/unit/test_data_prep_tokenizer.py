"""SentencePiece training (long lines kept, metadata, reuse) and the megatron-facing tokenizer."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import sentencepiece as spm
from workers.data_prep_common import NASTY, corpus_docs

from data_prep.base.errors import DataPrepError
from data_prep.sentencepiece_tokenizer import SentencePieceTokenizer, file_sha256
from data_prep.sources import Corpus
from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer, training_lines


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus_docs("wiki_vital", 300)


def test_long_lines_are_cut_not_skipped(tmp_path, docs):
    long_line = " ".join(["blorptastic"] * 4000)  # 48 kB, one line: spm alone would skip it
    lines = list(training_lines([long_line], 4192))
    assert len(lines) > 10 and all(len(x.encode()) <= 4192 for x in lines)
    assert " ".join(lines) == long_line
    corpus = Corpus("c", documents=lambda: [*docs[:50], long_line], fingerprint="x")
    model = train_tokenizer([corpus], tmp_path / "m", TokenizerOptions(vocab_size=600))
    assert len(spm.SentencePieceProcessor(model_file=str(model)).encode("blorptastic")) == 1


def test_metadata_and_reuse(tmp_path, docs):
    corpus = Corpus("wiki", documents=lambda: docs, fingerprint="abc")
    options = TokenizerOptions(vocab_size=700, pad_id=3)
    model = train_tokenizer([corpus], tmp_path / "tok", options)
    meta = SentencePieceTokenizer(model).metadata
    assert meta["sha256"] == file_sha256(model)
    assert meta["corpus"] == [{"name": "wiki", "documents": "abc"}]
    assert meta["options"]["vocab_size"] == 700 and meta["options"]["normalization"] == "identity"
    assert meta["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert meta["training_lines"] == sum(len([x for x in d.split("\n") if x.strip()]) for d in docs)

    mtime = model.stat().st_mtime_ns
    assert train_tokenizer([corpus], tmp_path / "tok", options) == model
    assert model.stat().st_mtime_ns == mtime  # reused
    other = TokenizerOptions(vocab_size=650, pad_id=3)
    train_tokenizer([corpus], tmp_path / "tok", other)
    assert SentencePieceTokenizer(model).vocab_size == 650  # options changed: retrained


def test_tokenizer_attributes_and_lossless_round_trip(tmp_path, docs):
    corpus = Corpus("wiki", documents=lambda: docs, fingerprint="abc")
    model = train_tokenizer([corpus], tmp_path / "tok", TokenizerOptions(vocab_size=700))
    tok = SentencePieceTokenizer(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert (tok.vocab_size, tok.eod, tok.pad) == (700, sp.eos_id(), -1)
    assert tok.unique_identifiers == OrderedDict(
        [
            ("class", "data_prep.sentencepiece_tokenizer.SentencePieceTokenizer"),
            ("sha256", file_sha256(model)),
        ]
    )
    assert sp.piece_to_id("\n") > 2  # newline is one piece, not bytes
    for text in [*NASTY, *docs[:20]]:
        assert tok.encode(text) == sp.encode(text)
        if "\u2581" not in text:  # sentencepiece reads its whitespace mark as a space
            assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist"):
        SentencePieceTokenizer(tmp_path / "none.model")
    with pytest.raises(DataPrepError, match="model_type"):
        TokenizerOptions(model_type="wordpiece")
    empty = Corpus("e", documents=lambda: ["", "  \n "], fingerprint="e")
    with pytest.raises(DataPrepError, match="no training text"):
        train_tokenizer([empty], tmp_path / "e")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"body": "c"}\n')
    with pytest.raises(DataPrepError, match=r"bad.jsonl:2: no text field 'text'"):
        train_tokenizer(
            [Corpus("b", paths=[str(bad)])], tmp_path / "b", TokenizerOptions(vocab_size=50)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no model, no temp dir
