"""Train a byte-level BPE tokenizer with the ``tokenizers`` library; write it as a Hugging Face
tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoTokenizer`` and
:class:`~data_prep.hf_tokenizer.HFTokenizer` both open.

``style="gpt2"``: GPT-2's recipe: bytes mapped to printable characters (every text encodes,
nothing is unknown), GPT-2's pre-tokenizer regex, no prefix space, one special token that ends
documents (EOS, also BOS and UNK in the config, as GPT-2's ``<|endoftext|>``).
``style="llama3"``: Llama 3's: its pre-tokenizer regex before the byte mapping, special tokens
``<|begin_of_text|>`` (BOS, added by the template when special tokens are asked for),
``<|end_of_text|>`` (EOS) and ``<|eot_id|>``. The directory is written whole under a temporary
name and renamed into place; training is deterministic for the same corpora.
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
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
#: Llama 3's pre-tokenizer regex (tiktoken's cl100k-style split)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _texts(corpora: list[Corpus]) -> Iterator[str]:
    for corpus in corpora:
        yield from corpus.texts()


def train_hf_bpe(
    corpora: list[Corpus],
    out: str | Path,
    vocab_size: int,
    *,
    style: str = "gpt2",
    progress: bool = True,
) -> Path:
    """Train on ``corpora``; write ``out/`` (replacing an earlier tokenizer there); return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style not in ("gpt2", "llama3"):
        raise DataPrepError(f"--hf-style {style!r} is not 'gpt2' or 'llama3'")
    specials = [EOS] if style == "gpt2" else list(LLAMA3_SPECIALS)
    base = 256 + len(specials)  # the byte alphabet and the special tokens
    if vocab_size <= base:
        raise DataPrepError(f"--vocab-size {vocab_size} must exceed {base} for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(_texts(corpora), trainer=trainer)
    if style == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        bos = eos = unk = EOS
    else:
        bos, eos, unk = specials[0], specials[1], None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if tok.get_vocab_size() < base:
        raise DataPrepError(f"training text too small: only {tok.get_vocab_size()} tokens")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    tokens = {"eos_token": eos, "bos_token": bos, **({"unk_token": unk} if unk else {})}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
