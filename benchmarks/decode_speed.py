"""Per-token decode latency on CPU: cached vs ``--no-cache`` recompute, twicing vs softmax.

One model shape, two variants (softmax; twicing in all layers), at contexts 512 and 2048 with
batch 1 and 8, measured side by side in one run (round-robin, medians). A *cached* step feeds one
token against a cache holding ``context`` positions (the cache offset is rewound before every
repeat, so each repeat does the same work); a *recompute* step is the ``--no-cache`` path, a full
forward over ``context + 1`` tokens. One intra-op thread by default (``--threads``): a decode
step is hundreds of small kernels, and on a shared or oversubscribed CPU their OpenMP barriers
turn a 3 ms step into hundreds of ms at random; both sides always run with the same threads.
Targets: cached ≥ 5× faster than recompute at 512; twicing ≤ 2.2× softmax with the cache (two
cache reads instead of one). At this small shape a step is dominated by per-layer work besides
the attention reads (projections, MLP, and megatron re-applying RoPE to the whole cached K,
which its static cache stores un-rotated), so the twicing overhead is well below 2×.

    python benchmarks/decode_speed.py [--layers 4 --hidden 256 --heads 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import interleaved, with_malloc_tuning  # noqa: E402


def init_one_rank() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.parallel.launch_env import free_port

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    from model import megatron_compat

    megatron_compat.install()


def build(attention: str, args: argparse.Namespace):
    from model import ModelConfig, build_gpt

    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        seq_length=max(args.contexts) + 1,
        attention=attention,
        attention_layers="all",
    )
    return build_gpt(cfg).eval()


def cached_step(model, batch: int, context: int, vocab: int):
    """A function doing one cached decode step at ``context`` cached positions."""
    from model.inference.context import DecodeContext
    from model.inference.generation import prefill, step

    g = torch.Generator().manual_seed(1)
    ctx = DecodeContext(batch, context + 1)
    prefill(model, ctx, torch.randint(0, vocab, (batch, context), generator=g))
    token = torch.randint(0, vocab, (batch, 1), generator=g)
    pos = torch.full((batch, 1), context)

    def run() -> None:
        ctx.sequence_len_offset = context  # rewind: every repeat appends the same slot
        step(model, ctx, token, pos)

    return run


def recompute_step(model, batch: int, context: int, vocab: int):
    """A function doing one ``--no-cache`` step: the full forward over ``context + 1`` tokens."""
    from model.inference.generation import full_forward_last

    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, vocab, (batch, context + 1), generator=g).tolist()
    return lambda: full_forward_last(model, rows)


def main() -> int:
    with_malloc_tuning()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed recomputes (cached steps: ×10)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    init_one_rank()
    models = {name: build(name, args) for name in ("softmax", "twicing")}
    print(
        f"decode latency per token, ms (median of {args.repeats}; {args.layers} layers, hidden "
        f"{args.hidden}, {args.heads} heads, vocab {args.vocab}, torch threads "
        f"{torch.get_num_threads()})",
        flush=True,
    )
    header = (
        f"{'context':>7} {'batch':>5} {'softmax':>9} {'twicing':>9} {'twicing':>10} "
        f"{'recompute/':>11} {'twicing/':>9}"
    )
    print(header)
    cols = ("", "", "cached", "cached", "no-cache", "cached", "softmax")
    print(" ".join(f"{c:>{w}}" for c, w in zip(cols, (7, 5, 9, 9, 10, 11, 9), strict=True)))
    results = []
    with torch.no_grad():
        for context in args.contexts:
            for batch in args.batches:
                fns = {
                    name: cached_step(m, batch, context, args.vocab) for name, m in models.items()
                }
                cached = interleaved(fns, repeats=args.repeats * 10, stat="median")
                slow = interleaved(
                    {"twicing": recompute_step(models["twicing"], batch, context, args.vocab)},
                    repeats=args.repeats,
                    warmup=0,
                    stat="median",
                )
                soft, twi, re = cached["softmax"], cached["twicing"], slow["twicing"]
                results.append((context, batch, re / twi, twi / soft))
                print(
                    f"{context:>7} {batch:>5} {soft * 1e3:>9.2f} {twi * 1e3:>9.2f} "
                    f"{re * 1e3:>10.1f} {re / twi:>10.1f}× {twi / soft:>8.2f}×",
                    flush=True,
                )
    speedup_512 = min(r[2] for r in results if r[0] == 512) if 512 in args.contexts else None
    worst = max(r[3] for r in results)
    if speedup_512 is not None:
        print(f"cached vs recompute at 512: ≥ {speedup_512:.1f}× (target ≥ 5×)")
    print(f"twicing vs softmax, cached: ≤ {worst:.2f}× (target ≤ 2.2×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
