"""Twicing vs softmax core attention on CPU: forward+backward time and activation memory.

Prints, per sequence length, the time of twicing over the time of two softmax attentions
(target ≤ 1.05: a two-call composition cannot beat 2.0× one softmax) and, at the longest length,
the official code's explicit ``(2A − A@A)·V`` over ours (target ≥ 10×). All ratios are measured
side by side in one run, round-robin, taking the fastest of ``--repeats`` runs of each (this
VM's noise only adds time; pass ``--stat median`` to see medians). glibc is told to keep freed
memory (see ``_timing.MALLOC_ENV``; ``TWICING_NO_MALLOC_TUNING=1`` turns that off).

    python benchmarks/attention_overhead.py [--seqs 256 1024 2048] [--repeats 11]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model.attention.backend import attend  # noqa: E402
from model.attention.twicing import twicing_attention  # noqa: E402

from _timing import interleaved, saved_activation_bytes, with_malloc_tuning  # noqa: E402


def explicit_official(q, k, v):
    """The official LM code's form: materialise A, then (2A − A@A)·V (O(N³))."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) * q.size(-1) ** -0.5
    mask = torch.ones(q.size(1), q.size(1), dtype=torch.bool).triu(1)
    a = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return ((2 * a - a @ a) @ vh).transpose(1, 2)


def fwd_bwd(fn, q, k, v):
    def step():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))

    return step


def main() -> int:
    with_malloc_tuning()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11, help="runs per length (half at >= 2048)")
    parser.add_argument("--stat", choices=["min", "median"], default="min")
    parser.add_argument("--skip-official", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, {args.stat} of runs"
    )
    print(
        f"{'seq':>5} {'softmax ms':>11} {'twicing ms':>11} {'tw/(2·sm)':>10} "
        f"{'softmax MiB':>12} {'twicing MiB':>12} {'mem ratio':>9}"
    )
    ok = True
    for s in args.seqs:
        q, k, v = (
            torch.randn(args.batch, s, args.heads, args.head_dim, requires_grad=True)
            for _ in range(3)
        )
        reps = args.repeats if s < 2048 else max(3, args.repeats // 2)
        t = interleaved(
            {"softmax": fwd_bwd(attend, q, k, v), "twicing": fwd_bwd(twicing_attention, q, k, v)},
            reps,
            stat=args.stat,
        )
        mem_sm = saved_activation_bytes(attend, q, k, v)
        mem_tw = saved_activation_bytes(twicing_attention, q, k, v)
        ratio = t["twicing"] / (2 * t["softmax"])
        ok &= ratio <= 1.05
        print(
            f"{s:>5} {t['softmax'] * 1e3:>11.1f} {t['twicing'] * 1e3:>11.1f} {ratio:>10.3f} "
            f"{mem_sm / 2**20:>12.1f} {mem_tw / 2**20:>12.1f} {mem_tw / mem_sm:>9.2f}"
        )
    if not args.skip_official:
        s = max(args.seqs)
        q, k, v = (
            torch.randn(args.batch, s, args.heads, args.head_dim, requires_grad=True)
            for _ in range(3)
        )
        t = interleaved(
            {
                "official": fwd_bwd(explicit_official, q, k, v),
                "ours": fwd_bwd(twicing_attention, q, k, v),
            },
            repeats=2,
            warmup=0,
        )
        speedup = t["official"] / t["ours"]
        ok &= speedup >= 10
        print(
            f"seq {s}: official explicit (2A − A@A)V {t['official']:.2f} s, "
            f"ours {t['ours']:.2f} s -> ours is {speedup:.1f}x faster (target >= 10x)"
        )
    print("targets:", "met" if ok else "MISSED", "(twicing <= 1.05x two softmax; >= 10x official)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
