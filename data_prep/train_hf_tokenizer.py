"""Train a byte-level BPE tokenizer with the ``tokenizers`` library; write it as a Hugging Face
tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoTokenizer`` and
:class:`~data_prep.hf_tokenizer.HFTokenizer` both open.

GPT-2's recipe: bytes mapped to printable characters (every text encodes, nothing is unknown),
GPT-2's pre-tokenizer regex, no prefix space, one special token that ends documents (EOS, also
BOS and UNK in the config, as GPT-2's ``<|endoftext|>``). The directory is written whole under a
temporary name and renamed into place; training is deterministic for the same corpora.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from data_prep.base.errors import DataPrepError
from data_prep.sources import Corpus

EOS = "<|endoftext|>"


def _texts(corpora: list[Corpus]) -> Iterator[str]:
    for corpus in corpora:
        yield from corpus.texts()


def train_hf_bpe(
    corpora: list[Corpus],
    out: str | Path,
    vocab_size: int,
    *,
    eos: str = EOS,
    progress: bool = True,
) -> Path:
    """Train on ``corpora``; write ``out/`` (replacing an earlier tokenizer there); return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    base = 256 + 1  # the byte alphabet and the special token
    if vocab_size <= base:
        raise DataPrepError(f"--vocab-size {vocab_size} must exceed {base} for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(_texts(corpora), trainer=trainer)
    if tok.get_vocab_size() < base:
        raise DataPrepError(f"training text too small: only {tok.get_vocab_size()} tokens")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos, "bos_token": eos, "unk_token": eos}, indent=2) + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
