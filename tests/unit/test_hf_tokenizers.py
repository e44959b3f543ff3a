"""Hugging Face tokenizers in data_prep: two tokenizers built here with ``tokenizers`` (a
GPT-2-style byte-level BPE, trained by ``data_prep train-tokenizer --kind hf-bpe``, and a
Llama-3-style one: regex pre-tokenizer, special tokens, a BOS template) tokenize three shared
corpora plus hostile documents byte for byte as Megatron-LM's ``preprocess_data.py
--tokenizer-type HuggingFaceTokenizer --append-eod`` does: megatron-core's own tokenizer class
for that flag (``MegatronTokenizer``, library ``huggingface``, the tool's defaults) and its
``IndexedDatasetBuilder`` write the reference. ``AutoTokenizer`` on the directory encodes the
same; bad tokenizers are refused naming them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_module
from workers.data_prep_common import NASTY, corpus_docs, write_jsonl

from data_prep.base.errors import DataPrepError

ROOT = Path(__file__).resolve().parents[2]
#: Llama 3's pre-tokenizer regex (tiktoken's cl100k-style split)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Three shared corpora (verse, prose, code documentation) and the hostile documents."""
    return [
        *corpus_docs("kjv", 60),
        *corpus_docs("shakespeare", 40, max_chars=30_000),
        *corpus_docs("python_docs", 40, max_chars=30_000),
        *NASTY,
    ]


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory, docs) -> dict[str, Path]:
    """{"gpt2": data_prep's hf-bpe, "llama3": a Llama-3-style tokenizer saved by transformers}."""
    need_module("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.sources import Corpus
    from data_prep.train_hf_tokenizer import train_hf_bpe

    root = tmp_path_factory.mktemp("hf-tokenizers")
    corpus = Corpus("train", documents=lambda: docs[:120], fingerprint="t")
    gpt2 = train_hf_bpe([corpus], root / "gpt2", 1000, progress=False)

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(docs[:120], trainer=trainer)
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", special_tokens=[(specials[0], bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2]
    )
    wrapped.save_pretrained(root / "llama3")
    return {"gpt2": gpt2, "llama3": root / "llama3"}


def megatron_reference(docs: list[str], tokenizer_dir: Path, out: Path) -> tuple[bytes, bytes]:
    """What ``preprocess_data.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR
    --append-eod`` writes (core_v0.16.1: its tokenizer system's defaults, one JSON line per
    document), with megatron-core's own tokenizer and writer."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    tok = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(tokenizer_dir), metadata_path={"library": "huggingface"},
        vocab_file=None, merges_file=None, additional_special_tokens=[], use_fast=False,
        trust_remote_code=False, include_special_tokens=False,
    )  # fmt: skip
    builder = IndexedDatasetBuilder(f"{out}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for doc in docs:
        ids = tok.tokenize(doc)
        if ids:
            ids = [*ids, tok.eod]
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(f"{out}.idx")
    return Path(f"{out}.bin").read_bytes(), Path(f"{out}.idx").read_bytes()


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_tokenize_is_byte_identical_to_megatron_preprocess_data(
    tmp_path, docs, tokenizers_dir, kind
):
    from data_prep.build import tokenize_corpora
    from data_prep.sources import Corpus

    directory = tokenizers_dir[kind]
    jsonl = write_jsonl(tmp_path / "mix.jsonl", docs)
    stats = tokenize_corpora(
        [Corpus("mix", paths=[str(jsonl)])], directory, tmp_path / "out", workers=2,
        shard_chars=200_000, progress=False,
    )["mix"]  # fmt: skip
    assert stats["shards"] > 3 and stats["documents"] == len(docs)
    ref_bin, ref_idx = megatron_reference(docs, directory, tmp_path / "megatron")
    assert (tmp_path / "out" / "mix_text_document.bin").read_bytes() == ref_bin
    assert (tmp_path / "out" / "mix_text_document.idx").read_bytes() == ref_idx


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_autotokenizer_and_ours_agree(tokenizers_dir, docs, kind, tmp_path):
    """Ids without special tokens (what data_prep writes), the EOS, BOS and vocabulary size as
    AutoTokenizer has them; the content hash does not depend on where the files are."""
    from transformers import AutoTokenizer

    from data_prep.tokenizer_kinds import load_tokenizer

    ours = load_tokenizer(tokenizers_dir[kind])
    theirs = AutoTokenizer.from_pretrained(str(tokenizers_dir[kind]), local_files_only=True)
    for doc in [*docs[::7], *NASTY]:
        assert ours.encode(doc) == theirs(doc, add_special_tokens=False)["input_ids"]
    assert (ours.eod, ours.vocab_size) == (theirs.eos_token_id, len(theirs))
    assert ours.bos == (theirs.bos_token_id if theirs.bos_token_id is not None else -1)
    text = "naïve café — 東京 🙂"
    assert ours.decode(ours.encode(text)) == text
    moved = shutil.copytree(tokenizers_dir[kind], tmp_path / "elsewhere")
    assert load_tokenizer(moved / "tokenizer.json").sha256 == ours.sha256


def test_train_tokenizer_hf_bpe_command(tmp_path, docs):
    """``data_prep train-tokenizer --kind hf-bpe``: a directory AutoTokenizer opens, with the
    EOS token data_prep ends documents with; the same corpus gives the same tokenizer."""
    from transformers import AutoTokenizer

    jsonl = write_jsonl(tmp_path / "c.jsonl", docs[:50])
    for out in (tmp_path / "a", tmp_path / "b"):
        run = subprocess.run(
            [sys.executable, "-m", "data_prep", "train-tokenizer", "--kind", "hf-bpe",
             "--corpus", f"c={jsonl}", "--vocab-size", "600", "--out", str(out), "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    assert hf.eos_token == "<|endoftext|>" and len(hf) == 600
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (
        tmp_path / "b/tokenizer.json"
    ).read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "data_prep", "train-tokenizer", "--kind", "hf-bpe", "--hf-style",
         "llama3", "--corpus", f"c={jsonl}", "--vocab-size", "600", "--out",
         str(tmp_path / "l3"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    from data_prep.tokenizer_kinds import load_tokenizer

    l3, ours = AutoTokenizer.from_pretrained(str(tmp_path / "l3")), load_tokenizer(tmp_path / "l3")
    text = "It's 2026: naïve 東京"
    assert l3(text)["input_ids"][0] == l3.bos_token_id == ours.bos  # the template's BOS
    assert l3(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert l3.eos_token == "<|end_of_text|>" and ours.eod == l3.eos_token_id


def test_bad_tokenizers_are_refused_naming_them(tmp_path, tokenizers_dir, docs):
    """No tokenizer.json, no EOS token, an EOS outside the vocabulary: exit 2 naming it, nothing
    written."""
    from data_prep.hf_tokenizer import HFTokenizer

    empty = tmp_path / "empty"
    empty.mkdir()
    no_eos = shutil.copytree(tokenizers_dir["gpt2"], tmp_path / "no-eos")
    (no_eos / "tokenizer_config.json").unlink()
    (no_eos / "special_tokens_map.json").unlink()
    unknown = shutil.copytree(tokenizers_dir["gpt2"], tmp_path / "unknown-eos")
    (unknown / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    (unknown / "special_tokens_map.json").unlink()
    with pytest.raises(DataPrepError, match="no tokenizer.json"):
        HFTokenizer(empty)
    jsonl = write_jsonl(tmp_path / "c.jsonl", docs[:5])
    for bad, needle in (
        (empty, f"tokenizer {empty}: a directory without tokenizer.json"),
        (no_eos, f"tokenizer {no_eos} has no EOS token"),
        (unknown, "eos_token '<|nope|>' is not in its vocabulary"),
    ):
        out = tmp_path / f"out-{bad.name}"
        run = subprocess.run(
            [sys.executable, "-m", "data_prep", "tokenize", "--corpus", f"c={jsonl}",
             "--tokenizer", str(bad), "--out-dir", str(out), "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr[-2000:]
        assert needle in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert not out.exists() or not any(out.iterdir())


def test_generation_holds_back_a_character_cut_by_its_last_token(tokenizers_dir):
    """Byte-level pieces: ids that stop inside a multi-byte character print without it (no
    U+FFFD), and the next id completes it."""
    from data_prep.tokenizer_kinds import load_tokenizer
    from pretrain.generate import completion_text

    tok = load_tokenizer(tokenizers_dir["gpt2"])
    prompt = [tok.eod, *tok.encode("The city")]
    ids = tok.encode(" 東京")  # bytes the small vocabulary has no merges for: several pieces
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts  # some prefix of the ids ends inside a character
    for k in cuts:
        text = completion_text(tok, prompt, ids[:k])
        assert "\ufffd" not in text and " 東京".startswith(text)
    assert completion_text(tok, prompt, ids) == " 東京"
