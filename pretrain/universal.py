"""``python -m pretrain.universal RUN_DIR [--tag step_…] [--workers N]``: convert a checkpoint
to a DeepSpeed universal checkpoint (what ``checkpoint.reshard=true`` does at the start of a job
with another TP × DP layout). The conversion is ``pretrain.checkpoint.reshard``."""

from __future__ import annotations

import argparse
import sys

from data_prep.base.run_command import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.universal", description=__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoint root or step_* dir")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed extract/merge processes")
    p.add_argument(
        "--trust-pickles",
        action="store_true",
        help="let DeepSpeed unpickle the files without the weights_only allow-list (code in a "
        "tampered file would run); only for checkpoints you wrote yourself",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pretrain.checkpoint.reader import resolve
        from pretrain.checkpoint.reshard import convert

        if args.workers < 1:
            from data_prep.base.errors import ConfigError

            raise ConfigError(f"--workers {args.workers} must be >= 1")
        out = convert(
            resolve(args.checkpoint, args.tag),
            workers=args.workers,
            quiet=False,
            trust_pickles=args.trust_pickles,
        )
        print(f"universal checkpoint: {out}")
        return 0

    return run_cli("universal", body)


if __name__ == "__main__":
    sys.exit(main())
