"""Documents → ids, exactly ``sp.encode(doc) + [eod]`` per document, but fast.

Why a cache is exact: in a SentencePiece BPE model trained with the default
``split_by_whitespace``, no piece contains the whitespace mark ``▁`` except as its first character
(:func:`fast_path_blocker` checks this on the model). So no merge spans the start of a
``▁``-prefixed segment of the normalised text, and since BPE merges the best-scoring pair, ties to
the leftmost, the merges inside a segment happen in the same order wherever the segment stands:
``encode(doc)`` is the concatenation of the encodings of its segments. Real text repeats its
segments (words) endlessly, so :class:`DocumentEncoder` normalises with the model's own normaliser,
splits at ``▁``, encodes each segment it has not seen before once (many joined into one C++ call,
split back at ``▁``-initial pieces) and expands cached ids with numpy. Other models are encoded
whole with ``sp.encode`` (unigram's Viterbi breaks ties between equal-score paths by position, e.g.
in ``=`` runs, so it is not segmentable; it is ~4× faster to encode anyway). Both paths are tested
to give identical ids.

A document that encodes to nothing gets no EOD (as Megatron-LM's ``preprocess_data.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.errors import DataPrepError

WS = "\u2581"  # SentencePiece's whitespace mark
_JOIN_CHARS = 8192  # characters of unseen segments per C++ call (BPE is superlinear in length)
_NORMAL, _USER_DEFINED, _UNUSED = 1, 4, 5


def _load_proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def fast_path_blocker(proto) -> str | None:
    """Why the segment cache would not be exact for this model, or None when it is."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # BPE; unigram's Viterbi breaks score ties by position
        return f"model type {trainer.model_type} is not BPE"
    if trainer.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    if trainer.pretokenization_delimiter:
        return "pretokenization_delimiter"
    if not norm.escape_whitespaces:
        return "escape_whitespaces is off"
    pieces = {p.piece for p in proto.pieces}
    if WS not in pieces:
        return f"{WS!r} is not a piece"
    for p in proto.pieces:
        if p.type in (_NORMAL, _USER_DEFINED, _UNUSED) and (WS in p.piece[1:] or " " in p.piece):
            return f"piece {p.piece!r} contains whitespace after its first character"
    return None


def encoder_blocker(model_path: str | Path) -> str | None:
    """Why :class:`DocumentEncoder` would encode whole documents for this model, or None."""
    try:
        return fast_path_blocker(_load_proto(Path(model_path)))
    except ImportError as e:  # pragma: no cover - protobuf comes with tensorboard
        return f"protobuf unavailable ({e})"


def _raw_proto(proto) -> bytes:
    """The same model with an identity normaliser: it encodes already-normalised text as is."""
    raw = type(proto)()
    raw.CopyFrom(proto)
    spec = raw.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.normalization_rule_tsv = ""
    raw.ClearField("denormalizer_spec")
    return raw.SerializeToString()


class DocumentEncoder:
    """Encode batches of documents to a flat id array plus per-document token counts.

    ``fast=False`` forces whole-document ``sp.encode`` (``num_threads`` C++ threads).
    ``max_cache`` bounds the number of cached segments (the cache restarts when full).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        fast: bool = True,
        num_threads: int = 1,
        max_cache: int = 2_000_000,
    ) -> None:
        model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.eod = self.sp.eos_id()
        if self.eod < 0:
            raise DataPrepError(f"{model_path} has no eos id (it is the end-of-document id)")
        self.num_threads = num_threads
        self.max_cache = max_cache
        self.blocker: str | None = "disabled" if not fast else None
        if fast:
            try:
                proto = _load_proto(model_path)
            except ImportError as e:  # pragma: no cover - protobuf is a dependency of tensorboard
                proto, self.blocker = None, f"protobuf unavailable ({e})"
            if proto is not None:
                self.blocker = fast_path_blocker(proto)
        self.fast = self.blocker is None
        if self.fast:
            self._raw = spm.SentencePieceProcessor(model_proto=_raw_proto(proto))
            pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
            self._starts_ws = np.array([p.startswith(WS) for p in pieces], dtype=bool)
            spec = proto.normalizer_spec
            # identity normaliser: normalize(t) == WS + t with " " → WS (no call into C++ needed)
            self._identity = (
                spec.name == "identity"
                and not spec.precompiled_charsmap
                and spec.add_dummy_prefix
                and not spec.remove_extra_whitespaces
            )
            self._reset_cache()

    # ----------------------------------------------------------------------------------- public
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, doc_lens)``: int32 ids of all documents, each followed by EOD, and each
        document's id count (EOD included; 0 for a document that encodes to nothing)."""
        if not self.fast:
            return self._encode_whole(texts)
        try:
            return self._encode_segments(texts)
        except _BrokenInvariant as e:  # never expected; stay exact rather than fast
            warnings.warn(f"segment cache disabled: {e}", RuntimeWarning, stacklevel=2)
            self.fast, self.blocker = False, str(e)
            return self._encode_whole(texts)

    # ---------------------------------------------------------------------------------- whole
    def _encode_whole(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.sp.encode(list(texts), num_threads=self.num_threads)
        lens = np.fromiter((len(x) + 1 if x else 0 for x in ids), np.int64, len(ids))
        eod = [self.eod]
        flat = np.fromiter(
            chain.from_iterable(chain(x, eod) if x else x for x in ids),
            np.int32,
            int(lens.sum()),
        )
        return flat, lens

    # ------------------------------------------------------------------------------- segments
    def _reset_cache(self) -> None:
        # segment -> row of the store; row 0 is EOD (key None); heads (text before the first WS
        # when the normaliser adds no prefix) are stored under 1-tuples.
        self._cache: dict = {None: 0}
        self._tok = np.empty(1 << 16, dtype=np.int32)
        self._tok[0] = self.eod
        self._ntok = 1
        self._start = np.zeros(1 << 12, dtype=np.int64)
        self._len = np.ones(1 << 12, dtype=np.int64)
        self._nseg = 1

    def _segments(self, text: str) -> list:
        """The cache keys of one document (empty if it encodes to nothing), EOD excluded."""
        if self._identity:
            if not text:
                return []
            if WS in text:
                text = text.replace(WS, " ")
            return text.split(" ")  # part p is the segment WS + p
        norm = self.sp.normalize(text)
        if not norm:
            return []
        parts = norm.split(WS)
        if parts[0]:
            parts[0] = (parts[0],)
        else:
            del parts[0]
        return parts

    def _encode_segments(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        keys: list = []
        nkeys = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            try:
                seg = self._segments(text)
            except UnicodeEncodeError as e:
                raise DataPrepError(f"document {i} of the batch is not valid Unicode: {e}") from e
            if seg:
                keys += seg
                keys.append(None)
                nkeys[i] = len(seg) + 1
        if not keys:
            return np.zeros(0, np.int32), nkeys
        n = len(keys)
        first: dict = {}  # key -> index of its first occurrence; one C-level pass over the keys
        occurrence = np.fromiter(map(first.setdefault, keys, range(n)), np.int64, n)
        if len(self._cache) + len(first) > self.max_cache:
            self._reset_cache()
        unseen = first.keys() - self._cache.keys()
        if unseen:
            self._add(list(unseen))
        rows = np.fromiter(map(self._cache.__getitem__, first), np.int64, len(first))
        row_at = np.empty(n, dtype=np.int64)
        row_at[np.fromiter(first.values(), np.int64, len(first))] = rows
        seg_rows = row_at[occurrence]
        lens = self._len[seg_rows]
        ends = np.cumsum(lens)
        total = int(ends[-1])
        idx = np.arange(total, dtype=np.int64)
        idx += np.repeat(self._start[seg_rows] - (ends - lens), lens)
        ids = self._tok[idx]
        key_ends = np.cumsum(nkeys)
        tok_ends = np.concatenate(([0], ends))[key_ends]
        doc_lens = np.diff(np.concatenate(([0], tok_ends)))
        return ids, doc_lens

    def _add(self, unseen: list) -> None:
        """Encode unseen segments and append them to the store."""
        words = [k for k in unseen if isinstance(k, str)]
        heads = [k for k in unseen if not isinstance(k, str)]
        chunks, chunk, size = [], [], 0
        for w in words:
            chunk.append(w)
            size += len(w) + 1
            if size >= _JOIN_CHARS:
                chunks.append(chunk)
                chunk, size = [], 0
        if chunk:
            chunks.append(chunk)
        encoded = self._raw.encode([WS + WS.join(c) for c in chunks], num_threads=self.num_threads)
        pieces, lengths = [], []
        for c, ids in zip(chunks, encoded, strict=True):
            ids = np.asarray(ids, dtype=np.int32)
            starts = np.flatnonzero(self._starts_ws[ids])
            if len(starts) != len(c) or (len(ids) and starts[0] != 0):
                raise _BrokenInvariant(f"{len(c)} segments gave {len(starts)} word starts")
            pieces.append(ids)
            lengths.append(np.diff(np.append(starts, len(ids))))
        for h in heads:
            ids = np.asarray(self._raw.encode(h[0]), dtype=np.int32)
            pieces.append(ids)
            lengths.append(np.array([len(ids)], dtype=np.int64))
        self._append(unseen_order=words + heads, ids=pieces, lens=lengths)

    def _append(self, unseen_order: list, ids: list[np.ndarray], lens: list[np.ndarray]) -> None:
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        seg_lens = np.concatenate(lens).astype(np.int64)
        n, m = len(seg_lens), len(flat)
        if self._ntok + m > len(self._tok):
            self._tok = _grow(self._tok, self._ntok + m)
        if self._nseg + n > len(self._start):
            self._start = _grow(self._start, self._nseg + n)
            self._len = _grow(self._len, self._nseg + n)
        self._tok[self._ntok : self._ntok + m] = flat
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(seg_lens[:-1], out=starts[1:])
        self._start[self._nseg : self._nseg + n] = starts + self._ntok
        self._len[self._nseg : self._nseg + n] = seg_lens
        self._cache.update(zip(unseen_order, range(self._nseg, self._nseg + n), strict=True))
        self._ntok += m
        self._nseg += n


class _BrokenInvariant(RuntimeError):
    pass


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    out = np.empty(max(need, 2 * len(a)), dtype=a.dtype)
    out[: len(a)] = a
    return out
