"""A SentencePiece tokenizer shaped for megatron-core's ``GPTDataset`` (no torch import)."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import sentencepiece as spm

from data_prep.base.errors import DataPrepError


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def metadata_path(model_path: str | Path) -> Path:
    """``x.model`` → ``x.json``: the metadata written beside a trained model."""
    return Path(model_path).with_suffix(".json")


class SentencePieceTokenizer:
    """``sp.encode`` / ``sp.decode`` plus the attributes megatron-core's datasets read.

    ``eod`` is the model's eos id: it ends every document in the indexed datasets. ``pad`` is the
    model's pad id (-1 when it has none). ``unique_identifiers`` keys megatron's dataset caches on
    the model's sha256.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise DataPrepError(f"tokenizer model {self.model_path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:
            detail = " ".join(str(e).split())[:200]
            raise DataPrepError(
                f"tokenizer model {self.model_path} is not a sentencepiece model ({detail})"
            ) from None
        self.sha256 = file_sha256(self.model_path)
        self.vocab_size: int = self.sp.get_piece_size()
        self.eod: int = self.sp.eos_id()
        if self.eod < 0:
            raise DataPrepError(f"{self.model_path} has no eos id (it is the end-of-document id)")
        self.eos: int = self.eod
        self.bos: int = self.sp.bos_id()
        self.unk: int = self.sp.unk_id()
        self.pad: int = self.sp.pad_id()
        self.unique_identifiers = OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("sha256", self.sha256),
            ]
        )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no EOD appended)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def files(self) -> list[Path]:
        """The files that define this tokenizer (what checkpoints and exports copy)."""
        return [self.model_path]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def metadata(self) -> dict:
        """The JSON written beside the model by ``train_tokenizer`` (empty if absent)."""
        path = metadata_path(self.model_path)
        return json.loads(path.read_text()) if path.is_file() else {}

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"
