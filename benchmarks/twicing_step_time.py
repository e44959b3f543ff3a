"""Train-step time of twicing vs softmax GPTs of GPT-2-small shape at seq 1024, on CPU.

Three models with identical shape (12 layers, hidden 768, 12 heads, seq 1024; 124M parameters
with a 50,304 vocabulary): softmax everywhere, twicing in all layers, twicing in the last 2.
Full training steps (forward, backward, AdamW) through our DeepSpeed engine, measured round-robin
in one run. Targets: all-layer twicing ≤ 1.25× softmax, last-2 ≤ 1.05×.

    python benchmarks/twicing_step_time.py [--rounds 3] [--layers 12 --hidden 768 --seq 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _engine import config, engine_for, init_once, synthetic_batch, train_step  # noqa: E402
from _timing import with_malloc_tuning  # noqa: E402


def main() -> int:
    with_malloc_tuning()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    init_once()
    shape = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        f"model.seq_length={args.seq}",
        f"model.vocab_size={args.vocab}",
        "model.position_embedding=learned_absolute",
        "model.activation=gelu",
        "parallel.zero_stage=0",
        f"training.micro_batch_size={args.batch}",
        f"training.global_batch_size={args.batch}",
    ]
    variants = {
        "softmax": ["model.attention=softmax"],
        "twicing (all layers)": ["model.attention=twicing", "model.attention_layers=all"],
        "twicing (last 2)": ["model.attention=twicing", "model.attention_layers=last:2"],
    }
    runs = {}
    for name, extra in variants.items():
        cfg = config(shape + extra)
        runs[name] = (cfg, engine_for(cfg), synthetic_batch(cfg))
        train_step(*[runs[name][1], cfg, runs[name][2]])  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, (cfg, engine, batch) in runs.items():
            t0 = time.perf_counter()
            train_step(engine, cfg, batch)
            best[name] = min(best[name], time.perf_counter() - t0)
    n = sum(p.numel() for p in runs["softmax"][1].module.parameters())
    print(
        f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
        f"batch {args.batch}, {n / 1e6:.1f}M params; fastest of {args.rounds} steps each"
    )
    base = best["softmax"]
    ok = True
    for name, t in best.items():
        ratio = t / base
        target = {"twicing (all layers)": 1.25, "twicing (last 2)": 1.05}.get(name)
        verdict = (
            ""
            if target is None
            else f" (target <= {target}: {'met' if ratio <= target else 'MISSED'})"
        )
        ok &= target is None or ratio <= target
        print(f"{name:<22} {t:7.2f} s/step  ratio {ratio:.3f}{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
