"""Checkpoint save + load time: our CheckpointManager vs plain ``torch.save``/``torch.load`` of the
same tensors (target ratio ≤ 1.5), one process, measured round-robin in one run.

Ours = DeepSpeed's sharded files + per-rank RNG + trainer state + tokenizer-free extras +
checksums + completion marker + ``latest``, then verification and ``load_checkpoint``.
Plain = one ``torch.save`` of the model state dict and the optimizer state dict, and one
``torch.load`` of it.

    python benchmarks/checkpoint_io.py [--zero-stage 1] [--layers 8 --hidden 768] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _engine import config, engine_for, init_once, synthetic_batch, train_step  # noqa: E402
from _timing import with_malloc_tuning  # noqa: E402


def main() -> int:
    with_malloc_tuning()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    init_once()
    cfg = config(
        [
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            "model.num_attention_heads=12",
            f"model.ffn_hidden_size={4 * args.hidden}",
            "model.vocab_size=32000",
            "model.seq_length=128",
            "training.micro_batch_size=1",
            "training.global_batch_size=1",
            f"parallel.zero_stage={args.zero_stage}",
        ]
    )
    engine = engine_for(cfg)
    train_step(engine, cfg, synthetic_batch(cfg))  # populate optimizer state

    from model.tp_layout import layout_of
    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
    from pretrain.parallel import rng
    from pretrain.train_config import CheckpointConfig

    work = Path(tempfile.mkdtemp(prefix="twicing-ckpt-bench-"))
    manager = CheckpointManager(work / "ours", CheckpointConfig(keep_last=1))
    state = TrainerState(
        step=1,
        consumed_samples=cfg.training.global_batch_size,
        config=cfg.to_dict(),
        topology=Topology(tensor=1, data=1, zero_stage=args.zero_stage),
        tp_layout={k: v.to_json() for k, v in layout_of(engine.module).items()},
        tokenizer=TokenizerInfo("tokenizer.model", "0" * 64, cfg.model.vocab_size, 0),
    )

    def ours() -> int:
        manager.save(engine, 1, state, rng.capture())
        manager.load(engine, "step_00000001")
        return sum(
            f.stat().st_size for f in (work / "ours" / "step_00000001").rglob("*") if f.is_file()
        )

    def plain() -> int:
        path = work / "plain.pt"
        torch.save(
            {"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, path
        )
        torch.load(path, weights_only=False)
        return path.stat().st_size

    sizes = {"ours": ours(), "plain": plain()}  # warm-up, and the bytes each writes
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    shutil.rmtree(work, ignore_errors=True)
    n = sum(p.numel() for p in engine.module.parameters())
    print(
        f"{n / 1e6:.1f}M params, ZeRO-{args.zero_stage}, fastest of {args.rounds} save+load rounds"
    )
    for name in ("ours", "plain"):
        print(f"{name:<6} {best[name]:6.2f} s  ({sizes[name] / 2**20:,.0f} MiB written)")
    ratio = best["ours"] / best["plain"]
    print(
        f"save+load time ours / plain torch.save+load: {ratio:.2f} (target <= 1.5) -> "
        f"{'met' if ratio <= 1.5 else 'MISSED'}"
    )
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
