"""Megatron's MMIDIDX indexed-dataset format, written and read with numpy only (no torch).

``{prefix}.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1, ``<B`` dtype code (8 = uint16,
4 = int32), ``<Q`` sequence count, ``<Q`` document count + 1, then ``int32`` sequence lengths,
``int64`` byte pointers, ``int64`` document indices. ``{prefix}.bin``: the tokens. One sequence per
document, as Megatron-LM's ``tools/preprocess_data.py --append-eod`` writes; a document that encodes
to nothing has no sequence (its document index repeats), as there.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.base.atomic_write import atomic_open

HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 ids, else int32 (megatron-core's ``DType.optimal_dtype``)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


@dataclass
class Index:
    """The arrays of one ``.idx`` file."""

    dtype: np.dtype
    seq_lens: np.ndarray  # int32 [n_seq]
    pointers: np.ndarray  # int64 [n_seq]
    doc_idx: np.ndarray  # int64 [n_doc + 1]

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.seq_lens.sum(dtype=np.int64))


def index_bytes(seq_lens: np.ndarray, doc_idx: np.ndarray, dtype: np.dtype) -> bytes:
    """The ``.idx`` file contents for these sequence lengths and document boundaries."""
    seq_lens = np.asarray(seq_lens, dtype=np.int32)
    pointers = np.zeros(len(seq_lens), dtype=np.int64)
    np.cumsum(seq_lens[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    head = HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype)])
    head += struct.pack("<Q", len(seq_lens)) + struct.pack("<Q", len(doc_idx))
    return b"".join(
        (head, seq_lens.tobytes(), pointers.tobytes(), np.asarray(doc_idx, np.int64).tobytes())
    )


def doc_layout(doc_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence lengths and document indices for documents of these token counts (0 = empty)."""
    doc_lens = np.asarray(doc_lens, dtype=np.int64)
    nonempty = doc_lens > 0
    doc_idx = np.zeros(len(doc_lens) + 1, dtype=np.int64)
    np.cumsum(nonempty, out=doc_idx[1:])
    return doc_lens[nonempty].astype(np.int32), doc_idx


def write_dataset(prefix: str | Path, tokens: np.ndarray, doc_lens: np.ndarray, dtype) -> None:
    """Write ``{prefix}.bin`` and ``{prefix}.idx`` atomically (``.bin`` first)."""
    seq_lens, doc_idx = doc_layout(doc_lens)
    if int(seq_lens.sum(dtype=np.int64)) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but document lengths sum to {seq_lens.sum()}")
    with atomic_open(f"{prefix}.bin") as f:
        f.write(np.asarray(tokens).astype(dtype, copy=False).tobytes())
    with atomic_open(f"{prefix}.idx") as f:
        f.write(index_bytes(seq_lens, doc_idx, dtype))


def read_index(path: str | Path) -> Index:
    """Parse an ``.idx`` file (checks the header, version and sizes)."""
    data = Path(path).read_bytes()
    if len(data) < 34 or data[:9] != HEADER or struct.unpack_from("<Q", data, 9)[0] != 1:
        raise ValueError(f"{path}: not an MMIDIDX v1 index")
    code = data[17]
    if code not in CODE_DTYPES:
        raise ValueError(f"{path}: unsupported dtype code {code}")
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    off = 34
    seq_lens = np.frombuffer(data, np.int32, n_seq, off)
    pointers = np.frombuffer(data, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(data, np.int64, n_doc, off + 12 * n_seq)
    if off + 12 * n_seq + 8 * n_doc != len(data):
        raise ValueError(f"{path}: size does not match its counts")
    return Index(CODE_DTYPES[code], seq_lens, pointers, doc_idx)


def expected_bin_size(index: Index) -> int:
    """Bytes the ``.bin`` of ``index`` must have (its last sequence's end)."""
    if not len(index.seq_lens):
        return 0
    return int(index.pointers[-1]) + int(index.seq_lens[-1]) * index.dtype.itemsize


def read_tokens(prefix: str | Path) -> tuple[Index, np.ndarray]:
    """The index and all tokens of ``{prefix}.{idx,bin}`` (memory-mapped)."""
    index = read_index(f"{prefix}.idx")
    return index, np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")


def merge_datasets(parts: list[Path], prefix: Path, dtype) -> Index:
    """Concatenate indexed datasets ``parts`` (in order) into ``prefix``, atomically."""
    seq_lens, doc_idx, offset = [], [np.zeros(1, np.int64)], 0
    for part in parts:
        index = read_index(f"{part}.idx")
        if index.dtype != np.dtype(dtype):
            raise ValueError(f"{part}.idx has dtype {index.dtype}, expected {np.dtype(dtype)}")
        seq_lens.append(index.seq_lens)
        doc_idx.append(index.doc_idx[1:] + offset)
        offset += len(index.seq_lens)
    seq = np.concatenate(seq_lens) if seq_lens else np.zeros(0, np.int32)
    docs = np.concatenate(doc_idx)
    with atomic_open(f"{prefix}.bin") as out:
        for part in parts:
            with open(f"{part}.bin", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    with atomic_open(f"{prefix}.idx") as out:
        out.write(index_bytes(seq, docs, dtype))
    return read_index(f"{prefix}.idx")
