"""``python -m data_prep``: wikitext, train-tokenizer, tokenize, blend, check and stats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.base.errors import DataPrepError
from data_prep.base.output_guard import guard_outputs, output_option


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="NAME=PATH_OR_GLOB[,...] (.jsonl/.json/.parquet/.txt, optionally .gz/.xz/.bz2/.zst) "
        "or NAME=hf:PATH:CONFIG:SPLIT (datasets streaming); repeatable",
    )
    p.add_argument("--text-field", default="text", help="JSON key / column of the text")
    p.add_argument(
        "--text-unit",
        default="file",
        choices=["file", "line", "paragraph"],
        help="one document per .txt file, line or paragraph",
    )


def _corpora(args):
    from data_prep.sources import parse_corpus

    return [parse_corpus(s, args.text_field, args.text_unit) for s in args.corpus]


def _entry(spec: str) -> tuple[str, float]:
    prefix, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return prefix, float(weight)
    except ValueError:
        raise DataPrepError(f"{spec!r}: expected PREFIX[:WEIGHT]") from None


# ------------------------------------------------------------------------------- commands
def cmd_wikitext(args) -> None:
    if args.export_hub_layout:
        from data_prep.splits import SPLIT_NAMES
        from data_prep.wikitext import export_hub_layout, resolve_source

        src = resolve_source(args.name, args.source, cache_dir=args.cache_dir)
        rows = {s: src.rows(s) for s in SPLIT_NAMES if src.has_split(s)}
        out = export_hub_layout(rows, args.export_hub_layout, args.name)
        print(f"wrote {sorted(rows)} of {args.name} from {src.describe()} to {out}")
        return
    from data_prep.prepare_wikitext import prepare_wikitext

    if not args.out_dir:
        raise DataPrepError("--out-dir is required")
    path = prepare_wikitext(
        args.out_dir,
        name=args.name,
        source=args.source,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        workers=args.workers,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        tokenizer=args.tokenizer,
    )
    print(path)


def cmd_train_tokenizer(args) -> None:
    if args.kind == "hf-bpe":
        from data_prep.train_hf_tokenizer import train_hf_bpe

        progress = not args.no_progress
        out = train_hf_bpe(
            _corpora(args), args.out, args.vocab_size, style=args.hf_style, progress=progress
        )
        print(out)
        return
    from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    options = TokenizerOptions(
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        normalization=args.normalization,
        byte_fallback=not args.no_byte_fallback,
        newline_piece=not args.no_newline_piece,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        unk_id=args.unk_id,
        bos_id=args.bos_id,
        eos_id=args.eos_id,
        pad_id=args.pad_id,
        user_defined_symbols=args.user_defined_symbols or [],
        seed=args.seed,
    )
    model = train_tokenizer(
        _corpora(args), args.out, options, num_threads=args.threads, progress=not args.no_progress
    )
    print(model)


def cmd_tokenize(args) -> None:
    from data_prep.build import tokenize_corpora

    stats = tokenize_corpora(
        _corpora(args),
        args.tokenizer,
        args.out_dir,
        workers=args.workers,
        shard_chars=args.shard_chars,
        fast=not args.no_fast,
        progress=not args.no_progress,
    )
    _print_stats(stats.values())


def cmd_blend(args) -> None:
    from data_prep.manifest import BlendEntry, Manifest

    def entries(specs):
        return [BlendEntry(Path(p).resolve(), w) for p, w in map(_entry, specs or [])]

    if args.corpus:
        if not args.split or args.train or args.valid or args.test:
            raise DataPrepError("give --split with --corpus, or --train/--valid/--test")
        manifest = Manifest(Path(args.tokenizer).resolve(), entries(args.corpus), args.split)
    else:
        per_split = {"train": entries(args.train), "valid": entries(args.valid)}
        if args.test:
            per_split["test"] = entries(args.test)
        manifest = Manifest(Path(args.tokenizer).resolve(), blend_per_split=per_split)
    print(manifest.save(args.out, check=not args.no_check))


def cmd_check(args) -> None:
    import numpy as np

    from data_prep.indexed import read_tokens
    from data_prep.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    tok = manifest.tokenizer()
    manifest.check_files()
    manifest.check_nonempty()
    for entry in manifest.entries():
        index, tokens = read_tokens(entry.prefix)
        if index.dtype.itemsize == 2 and tok.vocab_size >= 65500:
            raise DataPrepError(f"{entry.prefix}: uint16 ids but vocab size {tok.vocab_size}")
        if args.ids and len(tokens) and int(np.max(tokens)) >= tok.vocab_size:
            raise DataPrepError(f"{entry.prefix}: id {int(np.max(tokens))} >= vocab size")
    print(json.dumps({"ok": True, "documents": manifest.split_documents()}, indent=2))


def cmd_stats(args) -> None:
    from data_prep.build import stats_path
    from data_prep.indexed import read_index

    prefixes = [Path(p) for p in args.prefix]
    if args.manifest:
        from data_prep.manifest import load_manifest

        prefixes += [e.prefix for e in load_manifest(args.manifest).entries()]
    rows = []
    for prefix in dict.fromkeys(prefixes):
        sp = stats_path(prefix)
        if sp.is_file():
            rows.append(json.loads(sp.read_text()))
        else:
            index = read_index(f"{prefix}.idx")
            rows.append(
                {"name": prefix.name, "documents": index.num_docs, "tokens": index.num_tokens}
            )
    _print_stats(rows)


def _print_stats(rows) -> None:
    cols = ["name", "documents", "tokens", "bytes_per_token", "words", "articles"]
    rows = list(rows)
    cols = [c for c in cols if any(c in r for r in rows)]
    table = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(t, widths, strict=True))
            )
        )


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Corpora → SentencePiece tokenizer → Megatron indexed datasets → blends.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("wikitext", help="WikiText → tokenizer, indexed datasets and a manifest")
    output_option(p, "--out-dir", kind="dir", registry=parser, help="output directory")
    p.add_argument(
        "--name",
        default="wikitext-2",
        help="wikitext-2, wikitext-2-raw, wikitext-103, wikitext-103-raw",
    )
    p.add_argument(
        "--source",
        help="local copy: a directory in the hub's parquet layout, or of original wiki.* files "
        "(default: the hub, then $TWICING_SHARED/data/wikitext or ../shared/data/wikitext)",
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument(
        "--tokenizer",
        help="use this tokenizer instead of training one: a sentencepiece .model or a Hugging "
        "Face tokenizer directory",
    )
    p.add_argument("--workers", type=int, default=2)
    output_option(p, "--cache-dir", kind="dir", registry=parser, help="datasets cache directory")
    output_option(
        p,
        "--export-hub-layout",
        kind="dir",
        registry=parser,
        metavar="DIR",
        help="instead: write the splits to DIR in the hub's parquet layout",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_wikitext)

    p = sub.add_parser(
        "train-tokenizer",
        help="train a tokenizer on corpora: SentencePiece (default) or a Hugging Face byte-level "
        "BPE (--kind hf-bpe)",
    )
    _corpus_args(p)
    output_option(p, "--out", kind="any", registry=parser, required=True,
                  help="sentencepiece: a model prefix (writes PREFIX.model/.vocab/.json); "
                  "hf-bpe: the tokenizer directory")  # fmt: skip
    p.add_argument("--kind", choices=["sentencepiece", "hf-bpe"], default="sentencepiece")
    p.add_argument(
        "--hf-style",
        choices=["gpt2", "llama3"],
        default="gpt2",
        help="hf-bpe: GPT-2's pre-tokenizer and <|endoftext|>, or Llama 3's regex and specials",
    )
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument(
        "--normalization",
        default="identity",
        help="identity (lossless, default) or a sentencepiece rule (nmt_nfkc)",
    )
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--no-newline-piece", action="store_true", help='no "\\n" piece (identity)')
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="lines sampled for training (0 = all)",
    )
    for special, default in (("unk", 0), ("bos", 1), ("eos", 2), ("pad", -1)):
        p.add_argument(f"--{special}-id", type=int, default=default)
    p.add_argument("--user-defined-symbols", nargs="*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="corpora → {out}/{name}_text_document.{bin,idx}")
    _corpus_args(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        help="a sentencepiece .model, or a Hugging Face tokenizer directory (tokenizer.json)",
    )
    output_option(p, "--out-dir", kind="dir", registry=parser, required=True)
    p.add_argument("--workers", type=int, default=2, help="encoder processes (0 = in-process)")
    p.add_argument("--shard-chars", type=int, default=2_000_000, help="characters per shard")
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="encode whole documents with sp.encode (same ids, slower)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("blend", help="write a manifest of (prefix, weight) per split")
    p.add_argument("--tokenizer", required=True)
    output_option(p, "--out", kind="file", registry=parser, required=True,
                  help="manifest JSON path")  # fmt: skip
    p.add_argument("--corpus", nargs="+", metavar="PREFIX[:WEIGHT]", help="one blend (+ --split)")
    p.add_argument("--split", help="megatron split string, e.g. 949,50,1")
    for split in ("train", "valid", "test"):
        p.add_argument(f"--{split}", nargs="+", metavar="PREFIX[:WEIGHT]")
    p.add_argument("--no-check", action="store_true", help="skip the empty-split check")
    p.set_defaults(func=cmd_blend)

    p = sub.add_parser(
        "check", help="check a manifest: files (.bin sizes against .idx), tokenizer, no empty split"
    )
    p.add_argument("manifest")
    p.add_argument("--ids", action="store_true", help="also check every id < vocab size")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", help="documents, tokens, bytes/token of indexed datasets")
    p.add_argument("prefix", nargs="*", help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--manifest")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        guard_outputs(parser, args)  # before any command writes anything
        args.func(args)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named: unreadable, not a directory, disk full
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0
