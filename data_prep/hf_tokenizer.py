"""A Hugging Face tokenizer (``tokenizer.json`` and its config: a model's directory) through the
``tokenizers`` library alone, with the same interface as :class:`SentencePieceTokenizer`.

Ids are what Megatron-LM's ``tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer``
writes by default (its tokenizer system of core_v0.16.1 without
``--tokenizer-hf-include-special-tokens``): ``tokenizer.tokenize(text)`` converted to ids, i.e. the
backend's ``encode(text, add_special_tokens=False)``, so no BOS is prepended; with
``--append-eod`` the tokenizer's EOS id ends every non-empty document. ``transformers`` is not
needed (it would import torch): the EOS, BOS and pad tokens come from ``tokenizer_config.json``
(or ``special_tokens_map.json``) as ``AutoTokenizer`` reads them, and the vocabulary size is
``len(AutoTokenizer)``, i.e. the backend's size with added tokens.

``sha256`` is a content hash of the tokenizer's files (name and bytes of each), so a checkpoint,
a manifest and a dataset all name the same tokenizer whatever directory holds it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from data_prep.base.errors import DataPrepError

#: the files of a Hugging Face tokenizer that define its ids (copied into checkpoints/exports)
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_tokenizer_dir(path: str | Path) -> Path:
    """The directory of the tokenizer at ``path`` (a directory or its ``tokenizer.json``)."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        return path.parent
    return path


def content_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _token_text(value: Any) -> str | None:
    """``"</s>"`` or ``{"content": "</s>", ...}`` (an AddedToken as transformers writes it)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with the attributes megatron-core's datasets read."""

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.model_path = hf_tokenizer_dir(path)
        main = self.model_path / "tokenizer.json"
        if not main.is_file():
            raise DataPrepError(
                f"tokenizer {path}: no tokenizer.json there (a Hugging Face tokenizer directory "
                "holds tokenizer.json and tokenizer_config.json; a sentencepiece model is a .model "
                "file)"
            )
        try:
            self.tok = Tokenizer.from_file(str(main))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise DataPrepError(f"{main} is not a tokenizers tokenizer.json ({e})") from None
        config = self._json("tokenizer_config.json")
        special = self._json("special_tokens_map.json")

        def token(name: str) -> str | None:
            return _token_text(config.get(name)) or _token_text(special.get(name))

        eos = token("eos_token")
        if eos is None:
            raise DataPrepError(
                f"tokenizer {self.model_path} has no EOS token (eos_token in "
                "tokenizer_config.json or special_tokens_map.json): data_prep ends every document "
                "with it, as Megatron-LM does"
            )
        self.eod = self._id(eos, "eos_token")
        self.eos = self.eod
        bos = token("bos_token")
        self.bos = self._id(bos, "bos_token") if bos else -1
        pad = token("pad_token")
        self.pad = self._id(pad, "pad_token") if pad else -1
        self.unk = -1
        self.vocab_size: int = self.tok.get_vocab_size(with_added_tokens=True)
        self.sha256 = content_sha256(self.files())
        self.unique_identifiers = OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("sha256", self.sha256),
            ]
        )

    def _json(self, name: str) -> dict:
        path = self.model_path / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataPrepError(f"{path} is not valid JSON ({e})") from None
        return data if isinstance(data, dict) else {}

    def _id(self, text: str, key: str) -> int:
        i = self.tok.token_to_id(text)
        if i is None:
            raise DataPrepError(
                f"tokenizer {self.model_path}: {key} {text!r} is not in its vocabulary"
            )
        return i

    def files(self) -> list[Path]:
        """The files that define this tokenizer (what checkpoints and exports copy)."""
        return [self.model_path / n for n in HF_FILES if (self.model_path / n).is_file()]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens, no EOD appended)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; the backend's ``encode_batch_fast`` (the ids of ``encode_batch``
        without computing character offsets, which nothing here reads)."""
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def metadata(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"
