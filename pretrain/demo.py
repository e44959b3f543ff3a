"""The main job on an embedded default: ``make demo`` (or ``python -m pretrain.demo``).

1. prepares WikiText-2 (the real ``datasets`` call when the hub is reachable, else the local copy
   in ``$TWICING_WIKITEXT``, ``$TWICING_SHARED/data/wikitext`` or ``../shared/data/wikitext``),
2. trains a small twicing GPT on 2 CPU ranks (TP=2, DeepSpeed ZeRO-1) and stops half-way with a
   checkpoint (exit code 75, as after a preemption),
3. resumes from that checkpoint to the end,
4. evaluates the final checkpoint on all of WikiText-2 valid with ``pretrain.evaluate``
   (token- and word-level perplexity, bits per byte, over-smoothing curve) and prints where the
   results and TensorBoard logs are,
5. prints a short greedy sample of the final checkpoint (``pretrain.generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from data_prep.base.errors import ExitCode
from pretrain.local_launch import launch
from pretrain.train_config import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument(
        "--wikitext",
        default=os.environ.get("TWICING_WIKITEXT"),
        help="local WikiText copy (original files or the hub's parquet layout)",
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    from data_prep.prepare_wikitext import prepare_wikitext

    t0 = time.monotonic()
    manifest = Path(cfg.data.manifest)
    print(f"[demo] preparing WikiText-2 into {manifest.parent}", flush=True)
    made = prepare_wikitext(
        manifest.parent, name="wikitext-2", source=args.wikitext, vocab_size=cfg.model.vocab_size
    )
    if Path(made).resolve() != manifest.resolve():
        print(f"[demo] data_prep wrote {made}, but the config expects {manifest}", file=sys.stderr)
        return ExitCode.CONFIG

    train = ["-m", "pretrain.train", "--config", args.config, *args.overrides]
    half = cfg.training.train_steps // 2
    print(
        f"[demo] phase 1: train to step {half} on {args.nproc} ranks, then stop with a checkpoint",
        flush=True,
    )
    code = launch(args.nproc, [*train, f"training.exit_at_step={half}"])
    if code not in (ExitCode.OK, ExitCode.RESUMABLE):
        return code
    print("[demo] phase 2: resume from the latest checkpoint and finish", flush=True)
    code = launch(args.nproc, train)
    if code != ExitCode.OK:
        return code

    print("[demo] evaluating the final checkpoint on WikiText-2 valid", flush=True)
    out = Path(cfg.run_dir) / "eval" / "wikitext-2-valid.json"
    evaluate = [
        "-m",
        "pretrain.evaluate",
        "--checkpoint",
        cfg.run_dir,
        "--data",
        "wikitext-2:valid",
        "--out",
        str(out),
        "--batch-size",
        "16",
    ]
    if args.wikitext:
        evaluate += ["--wikitext", args.wikitext]
    code = launch(1, evaluate)
    if code != ExitCode.OK:
        return code
    report = json.loads(out.read_text())
    print(f"[demo] done in {time.monotonic() - t0:.0f}s")
    print(
        f"[demo] WikiText-2 valid after {report['step']} steps: token-level perplexity "
        f"{report['token_ppl']:.2f}, word-level {report['word_ppl']:.2f} "
        f"({report['tokens']:,} tokens, {report['words']:,} words)"
    )
    print(f"[demo] checkpoints: {cfg.checkpoint_dir}")
    print(f"[demo] evaluation: {out} (+ over-smoothing plot {out.with_suffix('.png')})")
    print(f"[demo] TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / 'tensorboard'}")
    print("[demo] a greedy sample from the final checkpoint (incremental decoding):", flush=True)
    sample = ["-m", "pretrain.generate", "--checkpoint", str(cfg.run_dir), "--temperature", "0"]
    return launch(1, [*sample, "--prompt", "The history of the", "--max-new-tokens", "32"])


if __name__ == "__main__":
    sys.exit(main())
