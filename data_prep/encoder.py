"""Documents → ids, exactly ``sp.encode(doc) + [eod]`` per document, but fast.

Why a cache is exact: in a SentencePiece BPE model trained with the default
``split_by_whitespace``, no piece contains the whitespace mark ``▁`` except as its first character
(:func:`fast_path_blocker` checks this on the model). So no merge spans the start of a
``▁``-prefixed segment of the normalised text, and since BPE merges the best-scoring pair, ties to
the leftmost, the merges inside a segment happen in the same order wherever the segment stands:
``encode(doc)`` is the concatenation of the encodings of its segments. The same holds at *walls*:
one-character pieces that no merge can reach — a user-defined piece such as data_prep's ``\n``
(SentencePiece never merges a user-defined match), or a piece that no other piece contains — so a
wall starts a segment of its own (``"end.\n\nThe"`` is ``▁end.``, ``\n``, ``\nThe``, and the
last repeats as often as paragraphs start with "The"). Real text repeats its segments endlessly, so
:class:`DocumentEncoder` normalises with the model's own normaliser, splits at ``▁`` and before
walls, looks every segment up in one C-level pass over a dict (an unseen one is given the next row
there and queued), encodes the queued ones (many joined into one C++ call, split back at their
first pieces) and expands cached ids with numpy. Other models are encoded whole with
``sp.encode`` (unigram's Viterbi breaks ties between equal-score paths by position, e.g. in ``=``
runs, so it is not segmentable; it is ~4× faster to encode anyway). Both paths are tested to give
identical ids.

A document that encodes to nothing gets no EOD (as Megatron-LM's ``preprocess_data.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_prep.base.errors import DataPrepError

WS = "\u2581"  # SentencePiece's whitespace mark
_JOIN_CHARS = 512  # characters of unseen segments per string (BPE is superlinear in length)
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
    ``max_cache`` bounds the number of cached segments (a batch that finds more starts afresh).
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
            self._wall_ids = self._find_walls(proto)
            self._is_wall = np.zeros(len(pieces), dtype=bool)
            self._is_wall[list(self._wall_ids.values())] = True
            self._ws_id = self.sp.piece_to_id(WS)
            space = " " if self._identity else WS
            self._wall_splits = [(w, space + w) for w in self._wall_ids]
            self._reset_cache()

    # ----------------------------------------------------------------------------------- public
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, doc_lens)``: int32 ids of all documents, each followed by EOD, and each
        document's id count (EOD included; 0 for a document that encodes to nothing)."""
        try:
            if self.fast:
                try:
                    return self._encode_segments(texts)
                except _BrokenInvariant as e:  # never expected; stay exact rather than fast
                    warnings.warn(f"segment cache disabled: {e}", RuntimeWarning, stacklevel=2)
                    self.fast, self.blocker = False, str(e)
            return self._encode_whole(texts)
        except (UnicodeEncodeError, TypeError) as e:  # sentencepiece: TypeError on surrogates
            bad = next((i for i, t in enumerate(texts) if not _is_utf8(t)), None)
            if bad is None:
                raise
            raise DataPrepError(f"document {bad} of the batch is not valid Unicode: {e}") from e

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
        # key -> row of the store; row 0 is EOD (key None). A str key k is the segment WS + k, or
        # k itself when it starts with a wall; a 1-tuple is a head (text before the first WS when
        # the normaliser adds no prefix).
        self._cache = _SegmentCache()
        self._cache[None] = 0
        self._tok = np.empty(1 << 16, dtype=np.int32)
        self._tok[0] = self.eod
        self._ntok = 1
        self._start = np.zeros(1 << 12, dtype=np.int64)
        self._len = np.ones(1 << 12, dtype=np.int64)

    @staticmethod
    def _find_walls(proto) -> dict[str, int]:
        """Walls: one-character pieces that no merge can reach, so that text splits exactly at
        them. A user-defined piece is never merged (SentencePiece freezes the prefix matcher's
        matches), so it is a wall when no other user-defined piece contains it; a normal one is a
        wall when no other piece of any kind contains it."""
        contained: set[str] = set()
        user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
        for p in proto.pieces:
            if len(p.piece) > 1:
                contained.update(p.piece)
        walls: dict[str, int] = {}
        for i, p in enumerate(proto.pieces):
            c = p.piece
            if len(c) != 1 or c in (WS, " ") or p.type not in (_NORMAL, _USER_DEFINED):
                continue
            in_user = any(c in u for u in user if u != c)
            if not in_user and (p.type == _USER_DEFINED or c not in contained):
                walls[c] = i
        return walls

    def _segments(self, text: str) -> list:
        """The cache keys of one document (empty if it encodes to nothing), EOD excluded."""
        if self._identity:
            if not text:
                return []
            if WS in text:
                text = text.replace(WS, " ")
            for wall, split_wall in self._wall_splits:  # each wall starts a key of its own
                if wall in text:
                    text = text.replace(wall, split_wall)
            return text.split(" ")  # part p is the segment WS + p (p itself if it starts a wall)
        norm = self.sp.normalize(text)
        if not norm:
            return []
        for wall, _ in self._wall_splits:
            if wall in norm:
                norm = norm.replace(wall, WS + wall)
        parts = norm.split(WS)
        if parts[0]:
            parts[0] = (parts[0],)
        else:
            del parts[0]
        return parts

    def _encode_segments(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if len(self._cache) > self.max_cache:
            self._reset_cache()
        docs: list[list] = []
        nkeys = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            seg = self._segments(text)
            if seg:
                seg.append(None)
                docs.append(seg)
                nkeys[i] = len(seg)
        n = int(nkeys.sum())
        if not n:
            return np.zeros(0, np.int32), nkeys
        # one C-level pass: a known key gives its row; an unseen one is given the next row and
        # queued (_SegmentCache.__missing__), and encoded below before any row is read
        rows = np.fromiter(map(self._cache.__getitem__, chain.from_iterable(docs)), np.int64, n)
        if self._cache.pending:
            try:
                self._fill_pending()
            except BaseException:
                self._reset_cache()  # rows were handed out for ids never stored
                raise
        ids, ends = self._gather(rows)
        tok_ends = np.concatenate(([0], ends))[np.cumsum(nkeys)]
        doc_lens = np.diff(np.concatenate(([0], tok_ends)))
        return ids, doc_lens

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored ids of ``rows`` concatenated, and each row's end offset in them."""
        lens = self._len[rows]
        ends = np.cumsum(lens)
        idx = np.arange(int(ends[-1]), dtype=np.int64)
        idx += np.repeat(self._start[rows] - (ends - lens), lens)
        return self._tok[idx], ends

    def _fill_pending(self) -> None:
        """Encode the queued keys into the store, at the rows the cache gave them."""
        cache = self._cache
        pending, cache.pending = cache.pending, []
        rows = np.arange(len(cache) - len(pending), len(cache))  # rows are handed out in order
        if len(cache) > len(self._start):
            self._start = _grow(self._start, len(cache))
            self._len = _grow(self._len, len(cache))
        if self._identity:  # no heads
            self._encode_keys(pending, rows)
            return
        head = np.fromiter((type(k) is tuple for k in pending), bool, len(pending))
        if not head.any():
            self._encode_keys(pending, rows)
            return
        self._encode_keys([k for k in pending if type(k) is not tuple], rows[~head])
        encoded = self._raw.encode([k[0] for k in pending if type(k) is tuple])
        lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
        self._store(rows[head], np.fromiter(chain.from_iterable(encoded), np.int32), lens)

    def _encode_keys(self, keys: list[str], rows: np.ndarray) -> None:
        """Encode str keys: ``WS + WS.join(keys)`` in chunks of about ``_JOIN_CHARS`` characters
        (one C++ call), split back at the WS-initial pieces (one per key). A key that starts with
        a wall thereby gets a lone WS piece first (WS merges with no wall), which is dropped."""
        n = len(keys)
        if not n:
            return
        ends = np.cumsum(np.fromiter(map(len, keys), np.int64, n) + 1)
        cuts = np.searchsorted(ends, np.arange(_JOIN_CHARS, int(ends[-1]), _JOIN_CHARS))
        bounds = np.unique(np.concatenate(([0], cuts + 1, [n])))
        bounds = bounds[bounds <= n].tolist()
        texts = [WS + WS.join(keys[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        encoded = self._raw.encode(texts, num_threads=self.num_threads)
        ids = np.fromiter(chain.from_iterable(encoded), np.int32)
        at = np.flatnonzero(self._starts_ws[ids])
        chunk_ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        per_chunk = np.diff(np.searchsorted(at, np.concatenate(([0], chunk_ends))))
        if len(at) != n or not np.array_equal(per_chunk, np.diff(bounds)):
            raise _BrokenInvariant(f"{n} segments gave {len(at)} word starts")
        lens = np.diff(np.append(at, len(ids)))
        if self._wall_ids:
            nxt = np.minimum(at + 1, len(ids) - 1)
            walled = (lens > 1) & (ids[at] == self._ws_id) & self._is_wall[ids[nxt]]
            if walled.any():
                keep = np.ones(len(ids), dtype=bool)
                keep[at[walled]] = False
                ids = ids[keep]
                lens = lens - walled
        self._store(rows, ids, lens)

    def _store(self, rows: np.ndarray, ids: np.ndarray, lens: np.ndarray) -> None:
        """Append ``ids`` (the keys of ``rows``, ``lens`` ids each) to the store."""
        m = len(ids)
        if self._ntok + m > len(self._tok):
            self._tok = _grow(self._tok, self._ntok + m)
        self._tok[self._ntok : self._ntok + m] = ids
        starts = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        self._start[rows] = starts + self._ntok
        self._len[rows] = lens
        self._ntok += m


class _SegmentCache(dict):
    """Segment key -> row of the token store. An unseen key is given the next row at lookup and
    queued in ``pending`` (its ids are filled in before any row is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list = []

    def __missing__(self, key) -> int:
        row = len(self)
        self[key] = row
        self.pending.append(key)
        return row


def _is_utf8(text) -> bool:
    try:
        text.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        return False
    return True


class _BrokenInvariant(RuntimeError):
    pass


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    out = np.empty(max(need, 2 * len(a)), dtype=a.dtype)
    out[: len(a)] = a
    return out


class HFDocumentEncoder:
    """:class:`DocumentEncoder`'s interface for a Hugging Face tokenizer: the ``tokenizers``
    backend's batch encoder (Rust; ``add_special_tokens=False`` as Megatron-LM writes by default)
    and the EOS id after every non-empty document."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        from data_prep.hf_tokenizer import HFTokenizer

        self.tokenizer = HFTokenizer(tokenizer_dir)
        self.eod = self.tokenizer.eod
        self.fast, self.blocker = True, None

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, doc_lens)`` as :meth:`DocumentEncoder.encode`."""
        try:
            ids = self.tokenizer.encode_batch(list(texts))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            bad = next((i for i, t in enumerate(texts) if not _is_utf8(t)), None)
            if bad is None:
                raise
            raise DataPrepError(f"document {bad} of the batch is not valid Unicode: {e}") from e
        lens = np.fromiter((len(x) + 1 if x else 0 for x in ids), np.int64, len(ids))
        eod = [self.eod]
        flat = np.fromiter(
            chain.from_iterable(chain(x, eod) if x else x for x in ids), np.int32, int(lens.sum())
        )
        return flat, lens
