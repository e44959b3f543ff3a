"""Per-rank parameter + optimizer-state bytes under ZeRO-3: DP=2 vs DP=1 (target ratio ≤ 0.55).

Counts, on each rank, the distinct storages of its parameter partitions (``ds_tensor``), the
optimizer's fp32 master partitions and the AdamW moments, after one real training step. Runs the
same model at DP=1 and DP=2 (two processes) and prints the per-rank ratio.

    python benchmarks/zero3_memory.py [--layers 6 --hidden 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def state_bytes(engine) -> dict[str, int]:
    seen: dict[int, tuple[str, int]] = {}

    def add(kind: str, t) -> None:
        if hasattr(t, "untyped_storage") and t.numel():
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), (kind, s.nbytes()))

    for p in engine.module.parameters():
        add("params", getattr(p, "ds_tensor", p.data))
    opt = engine.optimizer
    for t in getattr(opt, "fp32_partitioned_groups_flat", []):
        add("fp32_master", t)
    for state in opt.optimizer.state.values():
        for t in state.values():
            add("adam_moments", t)
    out: dict[str, int] = {}
    for kind, n in seen.values():
        out[kind] = out.get(kind, 0) + n
    out["total"] = sum(n for _, n in seen.values())
    return out


def worker(out: Path, shape: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from _engine import config, engine_for, init_once, synthetic_batch, train_step

    init_once()
    world = int(os.environ["WORLD_SIZE"])
    cfg = config(
        [
            *shape,
            "parallel.zero_stage=3",
            "training.micro_batch_size=1",
            f"training.global_batch_size={world}",
        ]
    )
    engine = engine_for(cfg)
    train_step(engine, cfg, synthetic_batch(cfg))
    measured = state_bytes(engine)
    if int(os.environ["RANK"]) == 0:
        out.write_text(json.dumps(measured))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, shape = p.parse_known_args()
    if args.worker:
        worker(args.worker, shape)
        return 0
    shape = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        "model.num_attention_heads=8",
        f"model.ffn_hidden_size={4 * args.hidden}",
        "model.vocab_size=8192",
        "model.seq_length=128",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dp in (1, 2):
            out = Path(tmp) / f"dp{dp}.json"
            cmd = [
                sys.executable,
                "-m",
                "pretrain.local_launch",
                "--nproc",
                str(dp),
                str(HERE / __file__),
                "--worker",
                str(out),
                *shape,
            ]
            subprocess.run(
                cmd,
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "DS_ACCELERATOR": "cpu"},
            )
            results[dp] = json.loads(out.read_text())
    print(f"ZeRO-3, {args.layers} layers, hidden {args.hidden}: per-rank bytes (MiB)")
    print(f"{'':>14} {'DP=1':>10} {'DP=2':>10} {'ratio':>7}")
    for kind in ("params", "fp32_master", "adam_moments", "total"):
        a, b = results[1].get(kind, 0), results[2].get(kind, 0)
        print(
            f"{kind:>14} {a / 2**20:>10.2f} {b / 2**20:>10.2f} {b / a if a else float('nan'):>7.3f}"
        )
    ratio = results[2]["total"] / results[1]["total"]
    print(
        f"per-rank parameter + optimizer state, DP=2 / DP=1: {ratio:.3f} (target <= 0.55) -> "
        f"{'met' if ratio <= 0.55 else 'MISSED'}"
    )
    return 0 if ratio <= 0.55 else 1


if __name__ == "__main__":
    sys.exit(main())
