"""Consolidate a sharded checkpoint into one TP=1 weights file (for evaluation and sharing).

``python -m pretrain.consolidate --checkpoint RUN_DIR [--tag step_…] --out model.pt [--dtype bf16]``

The file format is described in ``pretrain.checkpoint.consolidated``. ``python -m
pretrain.evaluate --checkpoint model.pt`` evaluates it (at TP=1, or sharded again at TP=N under
a launcher), and ``python -m pretrain.export_hf --checkpoint model.pt`` exports it.
Exit codes: 0 done, 2 bad arguments, 4 missing/incomplete/damaged checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli

DTYPE_NAMES = ("bf16", "fp32")


def consolidate(source, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the consolidated file for ``source`` (an opened ``Checkpoint`` or a path)."""
    from pretrain.checkpoint import consolidated
    from pretrain.checkpoint.layout import tokenizer_files
    from pretrain.checkpoint.reader import Checkpoint, full_state_dict, open_checkpoint

    check_out(out)
    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    return consolidated.save(
        out,
        weights=full_state_dict(ck),
        state=ck.state,
        source=str(ck.tag_dir),
        tokenizer_files=tokenizer_files(ck.tokenizer)[1],
        dtype=dtype,
    )


def check_out(out: str | Path) -> None:
    """Refuse an output inside/above a run or checkpoint dir, a directory, or an existing file
    that is not an earlier consolidated checkpoint (``ConfigError`` naming it)."""
    from data_prep.base.errors import CheckpointError, ConfigError
    from data_prep.base.output_guard import check_output

    check_output(out, "--out", "file", error=ConfigError)
    if Path(out).is_file():
        from pretrain.checkpoint.consolidated import load

        try:
            load(out)
        except CheckpointError:
            raise ConfigError(
                f"--out {out} exists and is not a consolidated checkpoint: not overwritten"
            ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.consolidate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint root or step_* dir")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    output_option(p, "--out", kind="file", required=True, type=Path,
                  help="output file (e.g. model.pt)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        from data_prep.base.errors import CheckpointError, ConfigError

        guard_outputs(parser, args, ConfigError)
        from pretrain.checkpoint.consolidated import is_consolidated, load
        from pretrain.checkpoint.reader import open_checkpoint

        t0 = time.monotonic()
        check_out(args.out)
        ck = open_checkpoint(args.checkpoint, args.tag)
        if is_consolidated(ck.tag_dir):
            raise CheckpointError(f"{ck.tag_dir} is already consolidated")
        out = consolidate(ck, args.out, args.dtype)
        n = sum(v.numel() for v in load(out)["state_dict"].values())
        print(
            f"consolidated {ck.tag_dir} (step {ck.step}, TP{ck.tensor_parallel} "
            f"ZeRO-{ck.zero_stage}) -> {out}: {n:,} parameters, {args.dtype}, "
            f"{out.stat().st_size / 2**20:.1f} MiB in {time.monotonic() - t0:.1f}s"
        )
        return 0

    return run_cli("consolidate", body)


if __name__ == "__main__":
    sys.exit(main())
