"""Checks of ``pretrain.evaluate``'s arguments that need no torch (run before anything loads)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.base.errors import ConfigError


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers, a missing ``--tokenizer`` and an ``--out`` that is not an earlier
    result before anything is loaded or written (``ConfigError`` naming the option and the
    value; the output paths themselves are guarded by ``output_guard.guard_outputs``)."""
    for option in ("batch_size", "stride", "length", "max_documents"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} {value} must be >= 1")
    if args.skip_positions < 0:
        raise ConfigError(f"--skip-positions {args.skip_positions} must be >= 0")
    for rate in args.swap_rates:
        if not 0.0 <= rate <= 1.0:  # NaN included
            raise ConfigError(f"--swap-rates {rate} is not in [0, 1]")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise ConfigError(f"--tokenizer {args.tokenizer} does not exist (or is not a file)")
    if args.out is not None and Path(args.out).is_file():
        try:
            previous = json.loads(Path(args.out).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            previous = None
        if not (isinstance(previous, dict) and "token_ppl" in previous):
            raise ConfigError(
                f"--out {args.out} exists and is not an earlier evaluation result: not overwritten"
            )
