"""The exported tokenizer: a sentencepiece run's model, plus HF tokenizer files that reproduce its
ids exactly when that is possible (verified at export time); a Hugging Face tokenizer's own files
(verified to encode as the run did)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def hf_tokenizer_json(model_path: Path) -> tuple[str | None, str]:
    """A ``tokenizers`` JSON reproducing ``sp.encode`` exactly, or ``(None, why not)``.

    Built for what ``data_prep`` trains: BPE, identity normalisation, whitespace kept, optional
    dummy prefix, single-character user-defined symbols. SentencePiece prepends the dummy ``▁``
    once per text and never merges across a ``▁``; HF's Llama conversion does neither exactly
    (it skips the prefix before a leading space and lets ``▁▁`` merge), hence this explicit
    normaliser (prepend, spaces → ``▁``) + ``Metaspace(split)`` pipeline. Control pieces are
    special tokens that text never produces (``split_special_tokens``), as in SentencePiece.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ts.model_type != ts.BPE:
        return None, "the sentencepiece model is not BPE"
    if ns.name != "identity" or ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        return None, f"the sentencepiece normaliser ({ns.name}) is not the identity"
    if not ts.split_by_whitespace or ts.treat_whitespace_as_suffix:
        return None, "the sentencepiece model does not split at whitespace as a prefix"
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    if any(len(p) != 1 for p in user):
        return None, "multi-character user-defined symbols"
    vocab, _scores, merges = SentencePieceExtractor(str(model_path)).extract()
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        fuse_unk=True,
        byte_fallback=ts.byte_fallback,
    )
    tok = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", "▁")]
    if ns.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    strip = [decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    control = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    tok.encode_special_tokens = True
    return tok.to_str(), ""


#: texts the exported HF tokenizer must encode exactly as sentencepiece does
PROBES = [
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : "
    "戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to \n",
    "Hello  world\t tabs\n\nnew  ",
    "  leading spaces and trailing   ",
    "émoji 🙂 ok, ﬁ ligature, ① circled, non\u00a0breaking, Ω≈ç√∫ 日本語",
    "<s> literal </s> and <unk> and <pad> are text",
    "x",
    " ",
    "",
    "\n\nstart\n",
]


def write_tokenizer(tokenizer, out: Path, probes: list[str]) -> str:
    """``tokenizer.model`` always; the HF tokenizer files when they reproduce ``sp.encode`` on
    ``probes`` (else a note why not). Returns a one-line summary. A Hugging Face tokenizer's
    files are copied as they are (``tokenizer_config.json`` gains a ``tokenizer_class`` if it had
    none) and ``AutoTokenizer`` on the export must encode ``probes`` as the run did."""
    if tokenizer.kind == "hf":
        return _write_hf_tokenizer(tokenizer, out, probes)
    shutil.copy2(tokenizer.model_path, out / "tokenizer.model")
    text, why = hf_tokenizer_json(Path(tokenizer.model_path))
    if text is None:
        return f"tokenizer.model only ({why}): encode with sentencepiece"
    sp = tokenizer.sp
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    (out / "tokenizer.json").write_text(text)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": piece(sp.bos_id()),
                "eos_token": piece(sp.eos_id()),
                "unk_token": piece(sp.unk_id()),
                "pad_token": piece(sp.pad_id()),
                "add_bos_token": False,
                "add_eos_token": False,
                "split_special_tokens": True,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000,
            },
            indent=1,
        )
    )
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    bad = [t for t in probes if hf(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    if bad:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink()
        return f"tokenizer.model only (the HF tokenizer differed from sentencepiece on {bad[0]!r})"
    return "tokenizer.model + tokenizer.json (AutoTokenizer, ids = sentencepiece's)"


def _write_hf_tokenizer(tokenizer, out: Path, probes: list[str]) -> str:
    for src in tokenizer.files():
        shutil.copy2(src, out / src.name)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config_path.write_text(json.dumps(config, indent=1))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    bad = [t for t in probes if hf(t, add_special_tokens=False)["input_ids"] != tokenizer.encode(t)]
    if bad:
        raise ValueError(f"AutoTokenizer on the export encodes {bad[0]!r} differently")
    if hf.eos_token_id != tokenizer.eod:
        raise ValueError(
            f"AutoTokenizer's eos id {hf.eos_token_id} is not the run's {tokenizer.eod}"
        )
    return "tokenizer.json (+ config) as trained with: AutoTokenizer encodes as the run did"
