"""Generate text from a checkpoint: ``python -m pretrain.generate --checkpoint RUN --prompt TEXT``.

Every variant (softmax, twicing, NeuTRENO, ResFormer, SVFormer, Neural Attention) decodes
incrementally (``model.inference``): the prompts are prefilled in one pass, then one token per
step against the per-layer caches (twicing adds its O1 cache). ``--no-cache`` recomputes the full
forward at every step instead (the reference path; same tokens when greedy). One process runs at
TP=1 whatever TP the run was trained with; under a launcher with N ranks it runs at TP=N
(``python -m pretrain.local_launch --nproc 2 -m pretrain.generate ...``). Checkpoint and
tokenizer resolution are those of ``pretrain.evaluate``.

Each prompt is fed as ``[eod] + tokenizer.encode(prompt)`` (documents follow an end-of-document
token in training) and continued until the tokenizer's end of document, ``--max-new-tokens`` or
the model's context. ``--temperature 0`` (default) is greedy; sampling (``--top-k``, ``--top-p``)
is seeded by ``--seed`` and reproducible. Prompts run in batches of ``--batch-size`` (left-padded).
``--out FILE.jsonl`` writes one object per prompt: ``prompt``, ``prompt_ids``, ``completion``,
``token_ids`` (generated ids, without the final eod), ``finish_reason``, ``tokens_per_sec``.

Exit codes: 0 done, 2 bad arguments (the message names the value), 4 missing, damaged or
tokenizer-less checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data_prep.base.errors import ConfigError
from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run dir, checkpoint root, step_* dir or consolidated .pt file",
    )
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--tokenizer", help="expected tokenizer model; must match the checkpoint's")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", type=Path, help="a file with one prompt per non-blank line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the full forward at every step (reference path)",
    )
    p.add_argument("--prefill-chunk", type=int, help="prefill prompts in chunks of N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    output_option(p, "--out", kind="file", allow_in_run=("eval",), type=Path,
                  help="write one JSON object per prompt (JSONL)")  # fmt: skip
    return p


def prompts_of(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values then ``--prompt-file`` lines; ``ConfigError`` if none or one is empty."""
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise ConfigError(f"--prompt-file {args.prompt_file} does not exist")
        data = args.prompt_file.read_bytes()
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--prompt-file {args.prompt_file} is not UTF-8 text: byte 0x{data[e.start]:02x} "
                f"at offset {e.start} cannot be decoded ({e.reason}); save it as UTF-8 (e.g. "
                f"iconv -f latin1 -t utf-8 {args.prompt_file})"
            ) from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise ConfigError(f"prompt {i + 1} is empty ({text!r}): give some text to continue")
    return prompts


def check_args(args: argparse.Namespace):
    """The sampling settings; ``ConfigError`` naming a bad value (before anything loads)."""
    from model.inference.sampling import Sampling

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    flags = {"temperature": "--temperature", "top-k": "--top-k", "top-p": "--top-p"}
    try:
        return Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        flag = next((f for name, f in flags.items() if str(e).startswith(name)), "")
        raise ConfigError(f"{flag} {str(e).split(' ', 1)[1]}".strip()) from None


def encode_prompts(prompts: list[str], tokenizer, context: int) -> list[list[int]]:
    """``[eod] + encode(prompt)`` each; ``ConfigError`` when one leaves no room to generate."""
    out = []
    for i, text in enumerate(prompts):
        ids = [tokenizer.eod, *tokenizer.encode(text)]
        if len(ids) >= context:
            short = text if len(text) <= 40 else text[:37] + "..."
            raise ConfigError(
                f"prompt {i + 1} ({short!r}) is {len(ids)} tokens including the leading "
                f"end-of-document token; the model's context is {context}: nothing fits after it"
            )
        out.append(ids)
    return out


def completion_text(tokenizer, prompt_ids: list[int], token_ids: list[int]) -> str:
    """The text the new ids add to the prompt's (decoded together, so a word-initial piece keeps
    its leading space; the leading eod is not text). When generation stopped inside a multi-byte
    character (byte-level pieces, or sentencepiece's byte fallback), its 1–3 leading bytes decode
    to U+FFFD: they are held back, as a streaming decoder holds them until the character is
    whole, so no broken UTF-8 is printed (``token_ids`` keeps every id)."""
    body = [i for i in prompt_ids if i != tokenizer.eod]
    head = tokenizer.decode(body)
    kept = token_ids
    for cut in range(1, min(3, len(token_ids)) + 1):
        if not tokenizer.decode(body + kept).endswith("\ufffd"):
            break
        kept = token_ids[:-cut]
    full = tokenizer.decode(body + kept)
    if full.endswith("\ufffd"):  # not a cut character: a U+FFFD the model wrote
        kept, full = token_ids, tokenizer.decode(body + token_ids)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(kept)


def run(args: argparse.Namespace) -> tuple[int, list[dict], dict]:
    """Generate for every prompt; ``(rank, records, totals)``."""
    sampling = check_args(args)
    prompts = prompts_of(args)
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(args.checkpoint, args.tag, args.tokenizer)
    context = ck.model.seq_length
    ids = encode_prompts(prompts, ck.tokenizer, context)

    from model.inference.generation import generate
    from pretrain.checkpoint.load_model import load_model
    from pretrain.parallel.distributed import init_for_inference

    rank, tp = init_for_inference()
    model = load_model(ck, rank, tp)
    records, t0 = [], time.perf_counter()
    for start in range(0, len(ids), args.batch_size):
        batch = ids[start : start + args.batch_size]
        results = generate(
            model,
            batch,
            max_new_tokens=args.max_new_tokens,
            eod=ck.tokenizer.eod,
            vocab_size=ck.tokenizer.vocab_size,
            context_length=context,
            sampling=sampling,
            seed=args.seed + start,
            use_cache=not args.no_cache,
            prefill_chunk=args.prefill_chunk,
        )
        for text, r in zip(prompts[start:], results, strict=False):
            records.append(
                {
                    "prompt": text,
                    "prompt_ids": r.prompt_ids,
                    "completion": completion_text(ck.tokenizer, r.prompt_ids, r.token_ids),
                    "token_ids": r.token_ids,
                    "finish_reason": r.finish_reason,
                    "tokens_per_sec": r.tokens_per_sec,
                }
            )
    seconds = time.perf_counter() - t0
    tokens = sum(len(r["token_ids"]) for r in records)
    totals = {
        "checkpoint": str(ck.tag_dir),
        "tokens": tokens,
        "seconds": seconds,
        "tensor_parallel": tp,
        "cache": not args.no_cache,
    }
    return rank, records, totals


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        guard_outputs(parser, args, ConfigError)  # before anything loads or is written
        rank, records, totals = run(args)
        if rank == 0:
            for i, r in enumerate(records, start=1):
                print(f"[{i}] {r['prompt']}{r['completion']}", flush=True)
            rate = totals["tokens"] / totals["seconds"] if totals["seconds"] > 0 else 0.0
            print(
                f"generated {totals['tokens']} tokens in {totals['seconds']:.2f} s "
                f"({rate:.1f} tokens/s; cache {'on' if totals['cache'] else 'off'}, "
                f"TP {totals['tensor_parallel']}) from {totals['checkpoint']}",
                flush=True,
            )
            if args.out is not None:
                from data_prep.base import atomic_write

                atomic_write.write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
                print(f"wrote {args.out}", flush=True)
        from pretrain.parallel.distributed import shutdown

        shutdown()
        return 0

    return run_cli("generate", body)


if __name__ == "__main__":
    sys.exit(main())
