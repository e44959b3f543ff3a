"""Helpers shared by the data_prep tests: corpus slices, JSONL files, a reference MMIDIDX writer."""

from __future__ import annotations

import itertools
import json
import lzma
import struct
from pathlib import Path

import numpy as np
from conftest import need_shared

#: documents that stress the encoders: empty, whitespace-only, runs of spaces, the whitespace mark
#: itself, NFKC-changing characters, combining marks, control characters, emoji, a 20 kB line.
NASTY = [
    "",
    " ",
    "\n\n",
    "a",
    " leading and trailing  ",
    "two  spaces and\ttab\nnew line",
    "\u2581 literal mark \u2581\u2581x",
    "ﬁ ½ Ⅻ \u3000 ideographic\u00a0nbsp",
    " \u0308a e\u0301 ",
    "\x00nul\x01 \r\n crlf \u2028 ls",
    "😀 😀😀 中文 字 \ufeffbom",
    "=" * 19 + "\n" + "-" * 33,
    "x" * 20000,
    " ".join(["word"] * 3000),
]


def corpus_docs(name: str, n: int, max_chars: int | None = None) -> list[str]:
    """The first ``n`` documents of a shared corpus (each cut to ``max_chars``)."""
    path = need_shared("data", "corpora", f"{name}.jsonl.xz")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in itertools.islice(f, n)]
    return [d[:max_chars] for d in docs] if max_chars else docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}) + "\n")
    return path


def reference_mmidx(docs: list[str], sp, vocab_size: int) -> tuple[bytes, bytes]:
    """``.bin`` and ``.idx`` bytes as Megatron-LM's ``preprocess_data.py --append-eod`` writes
    them, packed field by field from the format's description (independent of data_prep)."""
    dtype, code = (np.uint16, 8) if vocab_size < 65500 else (np.int32, 4)
    seqs = []
    for d in docs:
        ids = sp.encode(d)
        seqs.append(ids + [sp.eos_id()] if ids else [])  # no tokens: a document without sequence
    lens = [len(s) for s in seqs if s]
    doc_idx, n = [0], 0
    for s in seqs:
        n += bool(s)
        doc_idx.append(n)
    ptrs, p = [], 0
    for length in lens:
        ptrs.append(p)
        p += length * np.dtype(dtype).itemsize
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(lens)) + struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(lens)}i", *lens) + struct.pack(f"<{len(ptrs)}q", *ptrs)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return np.array([t for s in seqs for t in s], dtype=dtype).tobytes(), idx


def train_models(out: Path, docs: list[str], options: dict, n_train: int) -> dict[str, Path]:
    """One sentencepiece model per ``options`` entry, trained on the first ``n_train`` docs."""
    from data_prep.sources import Corpus
    from data_prep.train_tokenizer import train_tokenizer

    corpus = Corpus("train", documents=lambda: docs[:n_train], fingerprint="t")
    return {k: train_tokenizer([corpus], out / k, opt) for k, opt in options.items()}


def tokenize_like_megatron(out: Path, docs: list[str], model: Path, shard_chars: int):
    """Tokenize ``docs`` (JSONL, 2 workers, several shards) and assert the files are byte for byte
    those of Megatron's ``preprocess_data.py --append-eod``; returns (stats, sentencepiece)."""
    import sentencepiece as spm

    from data_prep.build import tokenize_corpora
    from data_prep.sources import Corpus

    jsonl = write_jsonl(out / "mix.jsonl", docs)
    stats = tokenize_corpora(
        [Corpus("mix", paths=[str(jsonl)])],
        model,
        out / "out",
        workers=2,
        shard_chars=shard_chars,
        progress=False,
    )["mix"]
    assert stats["shards"] > 3  # several shards were merged
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ref_bin, ref_idx = reference_mmidx(docs, sp, sp.get_piece_size())
    assert (out / "out" / "mix_text_document.bin").read_bytes() == ref_bin
    assert (out / "out" / "mix_text_document.idx").read_bytes() == ref_idx
    return stats, sp
