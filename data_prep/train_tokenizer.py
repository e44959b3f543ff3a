"""Train a SentencePiece model on corpora; save ``{prefix}.model`` plus ``{prefix}.json`` metadata.

SentencePiece silently skips training sentences longer than ``max_sentence_length`` bytes (4192 by
default), so documents are fed as lines (``\\n``-separated) and over-long lines are cut at
whitespace into pieces that fit. ``input_sentence_size`` samples that many lines from large inputs.
Defaults are lossless: identity normalisation, no whitespace folding, byte fallback, and ``\\n`` as
a user-defined piece (``normalization="nmt_nfkc"`` gives SentencePiece's default, lossy, behaviour).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece as spm

from data_prep.base.atomic_write import read_json, write_json
from data_prep.base.errors import DataPrepError
from data_prep.sentencepiece_tokenizer import file_sha256, metadata_path
from data_prep.sources import Corpus


@dataclass
class TokenizerOptions:
    """SentencePiece trainer options (see ``spm_train --help``)."""

    model_type: str = "bpe"
    vocab_size: int = 32000
    normalization: str = "identity"
    byte_fallback: bool = True
    newline_piece: bool = True  # "\n" as a user-defined piece (identity normalisation only)
    character_coverage: float = 0.9995
    input_sentence_size: int = 2_000_000
    max_sentence_length: int = 4192
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    user_defined_symbols: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise DataPrepError(f"model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
        if self.vocab_size < 8:
            raise DataPrepError(f"vocab_size must be >= 8, got {self.vocab_size}")
        if self.eos_id < 0:
            raise DataPrepError("eos_id must be set: it is the end-of-document id")

    def trainer_kwargs(self) -> dict:
        symbols = list(self.user_defined_symbols)
        identity = self.normalization == "identity"
        if identity and self.newline_piece and "\n" not in symbols:
            symbols.append("\n")
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "normalization_rule_name": self.normalization,
            "remove_extra_whitespaces": not identity,
            "byte_fallback": self.byte_fallback,
            "character_coverage": self.character_coverage,
            "input_sentence_size": self.input_sentence_size,
            "shuffle_input_sentence": True,
            "max_sentence_length": self.max_sentence_length,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "user_defined_symbols": symbols,
            "hard_vocab_limit": True,
        }


def training_lines(texts: Iterable[str], max_bytes: int = 4192) -> Iterator[str]:
    """Non-blank lines of the documents, over-long ones cut at whitespace to ``max_bytes``."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) <= max_bytes:
                yield line
            else:
                yield from _cut_line(line, max_bytes)


def _cut_line(line: str, max_bytes: int) -> Iterator[str]:
    piece, size = [], 0
    for word in line.split(" "):
        n = len(word.encode("utf-8")) + 1
        if piece and size + n > max_bytes:
            yield " ".join(piece)
            piece, size = [], 0
        if n > max_bytes:  # one enormous "word": hard cut by characters
            chars = max_bytes // 4
            yield from (word[i : i + chars] for i in range(0, len(word), chars))
            continue
        piece.append(word)
        size += n
    if piece and any(piece):
        yield " ".join(piece)


def train_tokenizer(
    corpora: list[Corpus],
    model_prefix: str | Path,
    options: TokenizerOptions | None = None,
    *,
    num_threads: int | None = None,
    reuse: bool = True,
    progress: bool = False,
) -> Path:
    """Train on the corpora's lines and write ``{model_prefix}.model/.vocab/.json``.

    With ``reuse``, an existing model whose metadata records the same corpora and options is kept.
    Returns the ``.model`` path. ``progress`` shows a bar while lines are read.
    """
    options = options or TokenizerOptions()
    model_prefix = Path(model_prefix)
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    corpus_info = [{"name": c.name, **c.identity()} for c in corpora]
    meta_file = metadata_path(model_path)
    if reuse and model_path.is_file() and meta_file.is_file():
        meta = read_json(meta_file)
        if (
            meta.get("corpus") == corpus_info
            and meta.get("options") == asdict(options)
            and meta.get("sha256") == file_sha256(model_path)
        ):
            return model_path
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    counts = {"lines": 0, "bytes": 0}

    def lines() -> Iterator[str]:
        for corpus in corpora:
            for line in training_lines(corpus.texts(), options.max_sentence_length):
                counts["lines"] += 1
                counts["bytes"] += len(line)
                yield line

    stream = lines()
    first = next(stream, None)
    if first is None:
        raise DataPrepError(f"no training text in corpora {[c.name for c in corpora]}")

    failure: list[DataPrepError] = []  # sentencepiece wraps errors raised by the iterator

    def feed() -> Iterator[str]:
        from tqdm import tqdm

        desc = f"tokenizer: lines for {options.model_type} {options.vocab_size}"
        with tqdm(desc=desc, unit=" lines", disable=not progress) as bar:
            i = 0
            try:
                for i, line in enumerate(itertools.chain([first], stream), 1):
                    if i % 4096 == 0:
                        bar.update(4096)
                    yield line
            except DataPrepError as e:
                failure.append(e)
                raise
            bar.update(i % 4096)

    spm.set_random_generator_seed(options.seed)
    with tempfile.TemporaryDirectory(dir=model_prefix.parent, prefix=".spm-") as tmp:
        tmp_prefix = Path(tmp) / "m"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=feed(),
                model_prefix=str(tmp_prefix),
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
                **options.trainer_kwargs(),
            )
        except RuntimeError as e:
            if failure:
                raise failure[0] from None
            raise DataPrepError(f"sentencepiece training failed: {e}") from e
        for ext in (".model", ".vocab"):
            os.replace(f"{tmp_prefix}{ext}", model_prefix.with_name(model_prefix.name + ext))
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    write_json(
        meta_file,
        {
            "sha256": file_sha256(model_path),
            "vocab_size": sp.get_piece_size(),
            "special_ids": {
                "unk": sp.unk_id(),
                "bos": sp.bos_id(),
                "eos": sp.eos_id(),
                "pad": sp.pad_id(),
            },
            "corpus": corpus_info,
            "training_lines": counts["lines"],
            "training_chars": counts["bytes"],
            "options": asdict(options),
            "sentencepiece_version": spm.__version__,
        },
    )
    return model_path
