"""Consolidate a sharded checkpoint into one TP=1 weights file (for evaluation and sharing).

``python -m pretrain.consolidate --checkpoint RUN_DIR [--tag step_…] --out model.pt [--dtype bf16]``

The TP shards (ZeRO 0–2: DeepSpeed's module states; ZeRO-3: rebuilt from the fp32 partitions)
are merged with the TP layout saved in the checkpoint. The output is a single ``torch.save`` file
that loads with ``torch.load(path, weights_only=True)``::

    {
      "format": "twicing-lm/consolidated", "format_version": 1,
      "step": int, "consumed_samples": int, "source": "<step dir>",
      "dtype": "float32" | "bfloat16",
      "trainer_state": {...},          # the source's trainer_state.json (config, topology, …)
      "state_dict": {name: tensor},    # megatron-core GPT parameter names at TP=1
      "tokenizer_model": uint8 tensor, # the run's sentencepiece model, byte for byte
    }

``python -m pretrain.evaluate --checkpoint model.pt`` evaluates it (at TP=1, or sharded again at
TP=N under a launcher), and ``python -m pretrain.export_hf --checkpoint model.pt`` exports it.
Exit codes: 0 done, 2 bad arguments, 4 missing/incomplete/damaged checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import CheckpointError

FORMAT = "twicing-lm/consolidated"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_consolidated(path: str | Path) -> bool:
    return Path(path).is_file()


def consolidate(source, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the consolidated file for ``source`` (an opened ``Checkpoint`` or a path)."""
    from pretrain import atomic
    from pretrain.evaluation.checkpoints import Checkpoint, full_state_dict, open_checkpoint

    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    weights = full_state_dict(ck)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": ck.step,
        "consumed_samples": int(ck.state.get("consumed_samples", 0)),
        "source": str(ck.tag_dir),
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "trainer_state": ck.state,
        "state_dict": {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in weights.items()},
        "tokenizer_model": torch.frombuffer(
            bytearray(Path(ck.tokenizer.model_path).read_bytes()), dtype=torch.uint8
        ),
    }
    out = Path(out)
    atomic.torch_save(payload, out, fsync=True)
    return out


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a consolidated file (``CheckpointError`` when it is not one)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable consolidated checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a twicing-lm consolidated checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {payload['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}"
        )
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.consolidate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint root or step_* dir")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--out", required=True, type=Path, help="output file (e.g. model.pt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    from pretrain.evaluation.checkpoints import open_checkpoint

    t0 = time.monotonic()
    try:
        ck = open_checkpoint(args.checkpoint, args.tag)
        if is_consolidated(ck.tag_dir):
            raise CheckpointError(f"{ck.tag_dir} is already consolidated")
        out = consolidate(ck, args.out, args.dtype)
    except CheckpointError as e:
        print(f"consolidate: checkpoint error: {e}", file=sys.stderr)
        return 4
    n = sum(v.numel() for v in load(out)["state_dict"].values())
    print(
        f"consolidated {ck.tag_dir} (step {ck.step}, TP{ck.tensor_parallel} ZeRO-{ck.zero_stage}) "
        f"-> {out}: {n:,} parameters, {args.dtype}, {out.stat().st_size / 2**20:.1f} MiB "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
