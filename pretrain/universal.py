"""``python -m pretrain.universal RUN_DIR [--tag step_…] [--workers N]``: convert a checkpoint
to a DeepSpeed universal checkpoint (what ``checkpoint.reshard=true`` does at the start of a job
with another TP × DP layout). The conversion is ``pretrain.checkpoint.reshard``."""

from __future__ import annotations

import argparse
import sys

from pretrain.cli import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.universal", description=__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoint root or step_* dir")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed extract/merge processes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from pretrain.checkpoint.reader import resolve
        from pretrain.checkpoint.reshard import convert

        out = convert(resolve(args.checkpoint, args.tag), workers=args.workers, quiet=False)
        print(f"universal checkpoint: {out}")
        return 0

    return run_cli("universal", body)


if __name__ == "__main__":
    sys.exit(main())
