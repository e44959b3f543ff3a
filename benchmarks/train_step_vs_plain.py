"""Our train step (megatron-core GPT + DeepSpeed engine) vs a plain-PyTorch GPT, CPU, 1 process.

Same shape, same attention function, same batch, AdamW + grad clipping on both sides; prints
tokens/s of each and the ratio ours / plain (target ≥ 1.0), measured round-robin in one run.

    python benchmarks/train_step_vs_plain.py [--attention twicing] [--rounds 8] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import with_malloc_tuning  # noqa: E402
from plain_gpt import PlainGPT  # noqa: E402


def main() -> int:
    with_malloc_tuning()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attention", default="twicing", choices=["twicing", "softmax"])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29577", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    from pretrain.parallel.distributed import init
    from pretrain.parallel.engine import build_engine, lm_loss
    from pretrain.parallel.launch_env import launch_env
    from pretrain.train_config import ParallelConfig, TrainConfig, load_config

    overrides = [
        "run_dir=/tmp/unused",
        "data.manifest=unused",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        f"model.vocab_size={args.vocab}",
        f"model.seq_length={args.seq}",
        "model.position_embedding=learned_absolute",
        "model.activation=gelu",
        "model.normalization=LayerNorm",
        f"model.attention={args.attention}",
        "parallel.zero_stage=0",
        f"training.micro_batch_size={args.batch}",
        f"training.global_batch_size={args.batch}",
        "optimizer.grad_clip=1.0",
    ]
    cfg: TrainConfig = load_config(None, overrides)
    init(launch_env(), ParallelConfig(), 10)
    torch.manual_seed(0)
    engine = build_engine(cfg, 1).engine
    from megatron.core import parallel_state

    from pretrain.parallel.optimizer import zero0_prepare_step

    tp_group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    plain = PlainGPT(cfg.model)
    opt = torch.optim.AdamW(
        plain.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
    )
    n_ours = sum(p.numel() for p in engine.module.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    pos = torch.arange(args.seq).expand(args.batch, -1)
    mask = torch.ones(args.batch, args.seq)

    def ours():
        loss = lm_loss(engine, x, pos, y, mask)
        engine.backward(loss)
        zero0_prepare_step(engine, tp_group, cfg.optimizer.grad_clip, False)
        engine.step()

    def theirs():
        loss = plain(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for fn in (ours, theirs):  # warm-up
        fn()
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("plain", theirs)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    tok = args.batch * args.seq
    print(
        f"shape: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
        f"batch {args.batch}, vocab {args.vocab}, attention {args.attention}; "
        f"params ours {n_ours:,} plain {n_plain:,}; {torch.get_num_threads()} threads"
    )
    labels = {"ours": "megatron-core + deepspeed ZeRO-0", "plain": "PyTorch module + AdamW"}
    for name, label in labels.items():
        ms = best[name] * 1e3
        print(f"{name:<5} ({label}): {tok / best[name]:,.0f} tok/s ({ms:.0f} ms/step)")
    ratio = best["plain"] / best["ours"]
    verdict = "met" if ratio >= 1.0 else "MISSED"
    print(f"tokens/s ratio ours/plain: {ratio:.3f} (target >= 1.0) -> {verdict}")
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
