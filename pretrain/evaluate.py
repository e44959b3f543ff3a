"""Perplexity evaluation of a checkpoint: ``python -m pretrain.evaluate --checkpoint RUN_DIR ...``.

Runs on one process at TP=1 (any saved TP size is merged), or under a launcher with N ranks at
TP=N (e.g. the TP the run was trained with). ``--checkpoint`` also takes a consolidated weights
file (``pretrain.consolidate``); ``--hf-model DIR`` scores a Hugging Face export
(``pretrain.export_hf``) instead, with the exported sentencepiece model, so the token ids and
the protocol are exactly those of the checkpoint's evaluation (one process, no over-smoothing).
Reports token-level perplexity, word-level perplexity normalised to the original whitespace
words (Megatron's "adjusted" perplexity, comparable with word-level WikiText numbers), bits per
byte, counts; optionally the same on text with seeded word swaps, per-layer over-smoothing and
per-layer attention entropy (``--attention-entropy``).
Writes a JSON file, a summary table, TensorBoard scalars and (with over-smoothing) a PNG.

Exit codes: 0 done, 2 bad arguments or data, 4 missing/incomplete/damaged checkpoint or a
tokenizer that does not match it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="run dir, checkpoint root, step_* dir or consolidated .pt file"
    )
    src.add_argument("--hf-model", type=Path, help="a Hugging Face export (pretrain.export_hf)")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument(
        "--data",
        default="wikitext-103-raw:valid",
        help="wikitext-{2,103}[-raw]:{valid,test,train}, or a data_prep corpus spec "
        "(NAME=FILES_OR_GLOBS or NAME=hf:PATH:CONFIG:SPLIT)",
    )
    p.add_argument("--wikitext", help="local WikiText copy (original files or hub parquet layout)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-unit", default="file", choices=["file", "line", "paragraph"])
    p.add_argument("--max-documents", type=int)
    p.add_argument("--tokenizer", help="expected tokenizer model; must match the checkpoint's")
    p.add_argument("--protocol", choices=["segments", "sliding"], default="segments")
    p.add_argument("--length", type=int, help="window length (default: the model's seq_length)")
    p.add_argument("--stride", type=int, help="sliding stride (default: length/2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--swap-rates",
        type=float,
        nargs="*",
        default=[],
        help="also evaluate with seeded word swaps at these rates",
    )
    p.add_argument("--swap-seed", type=int, default=0)
    p.add_argument("--oversmoothing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--skip-positions",
        type=int,
        default=0,
        help="leading positions left out of the over-smoothing and entropy metrics",
    )
    p.add_argument(
        "--attention-entropy",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also report each layer's mean attention entropy (costs one more QKᵀ per layer)",
    )
    output_option(p, "--out", kind="file", allow_in_run=("eval",), type=Path,
                  help="results JSON (default: <run>/eval/<tag>-<data>.json)")  # fmt: skip
    output_option(p, "--png", kind="file", allow_in_run=("eval",), type=Path,
                  help="over-smoothing plot (default: beside --out)")  # fmt: skip
    output_option(p, "--tensorboard", kind="dir", allow_in_run=("tensorboard",), type=Path,
                  help="TensorBoard dir (default: <run>/tensorboard/eval)")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        from data_prep.base.errors import ConfigError
        from pretrain.evaluation.checks import check_args

        guard_outputs(parser, args, ConfigError)
        check_args(args)  # before torch loads: bad numbers, --tokenizer, unsafe --out
        from pretrain.evaluation.driver import run, summary, write_outputs
        from pretrain.parallel.distributed import shutdown

        report = run(args)
        if report["_rank"] == 0:
            out = write_outputs(report, args)
            print(summary(report, out), flush=True)
        shutdown()
        return 0

    return run_cli("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
