"""Which tokenizer a path is, and the one way every command opens it.

A ``.model`` file is a SentencePiece model (:class:`SentencePieceTokenizer`); a directory holding
``tokenizer.json`` (a Hugging Face model's directory), or that ``tokenizer.json`` itself, is a
Hugging Face tokenizer (:class:`HFTokenizer`); a directory with only ``tokenizer.model`` is a
SentencePiece one. Both give ``encode``/``encode_batch``/``decode``, ``vocab_size``, ``eod``,
``pad``, ``sha256``, ``files()`` and megatron's ``unique_identifiers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from data_prep.base.errors import DataPrepError
from data_prep.hf_tokenizer import HFTokenizer
from data_prep.sentencepiece_tokenizer import SentencePieceTokenizer

Tokenizer = SentencePieceTokenizer | HFTokenizer
Kind = Literal["sentencepiece", "hf"]


def tokenizer_kind(path: str | Path) -> Kind:
    """The kind of tokenizer at ``path`` (``DataPrepError`` naming the path when neither)."""
    path = Path(path)
    if path.is_file():
        return "hf" if path.name == "tokenizer.json" else "sentencepiece"
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "hf"
        if (path / "tokenizer.model").is_file():
            return "sentencepiece"
        raise DataPrepError(
            f"tokenizer {path}: a directory without tokenizer.json (Hugging Face) or "
            "tokenizer.model (sentencepiece)"
        )
    raise DataPrepError(f"tokenizer {path} does not exist")


def load_tokenizer(path: str | Path, kind: Kind | None = None) -> Tokenizer:
    """The tokenizer at ``path`` (its kind found from the path unless given)."""
    path = Path(path)
    kind = kind or tokenizer_kind(path)
    if kind == "hf":
        return HFTokenizer(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    return SentencePieceTokenizer(path)
