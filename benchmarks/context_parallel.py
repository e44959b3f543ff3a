"""Context parallelism at a long sequence on CPU: step time, peak activation memory per rank and
the bytes each mode sends per layer, for C = 1, 2, 4 in both modes, side by side in one run.

Each configuration is a real launch (``pretrain.local_launch``, gloo, megatron-core's CP groups,
a DeepSpeed ZeRO-1 engine) of one GPT at ``--seq`` tokens, one sequence per step:

- **step s**: one full training step (forward, backward, gradient reduction, optimizer), the
  median of ``--steps`` after a warm-up step; ranks share the machine's cores (each rank gets
  ``cores / C`` threads), so on a 2-core machine C > 1 cannot be faster: it shows the overhead;
- **act MiB**: the resident-memory high-water mark of a forward + backward above its start
  (parameters, gradients and optimizer state already allocated), the largest over ranks: the
  activations and temporaries. glibc returns freed large blocks at once here
  (``MALLOC_MMAP_THRESHOLD_``), so the resident size follows the live tensors;
- **sent MiB/layer**: what one rank sends per layer in that forward + backward, counted at the
  collectives (all-gather: the input to each of ``C − 1`` peers; reduce-scatter and all-to-all:
  the ``(C − 1)/C`` of the input that leaves the rank), beside the derivation in
  ``model.attention.context_parallel`` (``derived``).

Rounds alternate the configurations; the table shows medians over ``--rounds``.

    python benchmarks/context_parallel.py [--seq 8192] [--variant twicing] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = [(1, "allgather"), (2, "allgather"), (2, "ulysses"), (4, "allgather"), (4, "ulysses")]
MIB = 2**20


# --------------------------------------------------------------------------- derivation
def derived_elements(variant: str, mode: str, c: int, s: int, heads: int, groups: int, d: int):
    """Elements one rank sends per (non-first) layer in a forward + backward (see
    ``model.attention.context_parallel``): all-gather moves every gathered sequence tensor
    ``(C−1)/C·s`` rows out of each rank forward (all-gather) and backward (reduce-scatter);
    Ulysses' all-to-alls send ``(C−1)/C`` of this rank's ``s/C`` rows of q, k, v and the output,
    forward and backward."""
    if c == 1:
        return 0.0
    extra_v = groups if variant in ("neutreno", "resformer") else 0  # V¹ travels beside V
    if mode == "allgather":
        width = 2 * groups + extra_v + (heads if variant == "twicing" else 0)
        return 2 * width * s * d * (c - 1) / c
    width = 2 * heads + 2 * groups + extra_v
    return 2 * width * (s / c) * d * (c - 1) / c


# --------------------------------------------------------------------------- worker
class SentCounter:
    """Wraps torch.distributed's tensor collectives (before megatron-core binds them) to count
    the elements this rank sends on the context-parallel group while ``on``."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.on, self.elements, self.group = False, 0.0, None
        ag, rs, a2a = (
            dist.all_gather_into_tensor,
            dist.reduce_scatter_tensor,
            dist.all_to_all_single,
        )

        def tensors(args, kwargs) -> tuple:
            """(output, input, group) whether passed by position or by either keyword style."""
            out = args[0] if args else kwargs.get("output", kwargs.get("output_tensor"))
            inp = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
            return out, inp, kwargs.get("group")

        def counted(fn, share):
            def wrapper(*args, **kwargs):
                out, inp, group = tensors(args, kwargs)
                if self.on and group is self.group:
                    self.elements += share(out, inp, dist.get_world_size(group))
                return fn(*args, **kwargs)

            return wrapper

        all_gather = counted(ag, lambda out, inp, c: inp.numel() * (c - 1))
        reduce_scatter = counted(rs, lambda out, inp, c: out.numel() * (c - 1))
        all_to_all = counted(a2a, lambda out, inp, c: inp.numel() * (c - 1) / c)

        dist.all_gather_into_tensor = all_gather
        dist.reduce_scatter_tensor = reduce_scatter
        dist.all_to_all_single = all_to_all


def _rss_and_peak() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _settle() -> int:
    """Free what can be freed and restart the high-water mark at the current resident size."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_and_peak()[0]


def worker(out: Path, c: int, mode: str, steps: int, overrides: list[str]) -> None:
    import warnings

    from data_prep.base.warning_filters import quiet_known_warnings

    quiet_known_warnings()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's collective renames
    counter = SentCounter()  # before megatron-core imports the collectives
    import torch

    sys.path.insert(0, str(HERE))
    from megatron.core import parallel_state as ps

    from pretrain.parallel.context import keep_local_tokens
    from pretrain.parallel.engine import lm_loss
    from pretrain.train_config import ParallelConfig

    from _engine import config, engine_for, init_once, synthetic_batch, train_step

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // c))
    init_once(parallel=ParallelConfig(context=c, context_mode=mode))
    counter.group = ps.get_context_parallel_group()
    cfg = config(
        [*overrides, f"parallel.context={c}", f"parallel.context_mode={mode}",
         "training.micro_batch_size=1", "training.global_batch_size=1"]
    )  # fmt: skip
    engine = engine_for(cfg)
    batch = tuple(keep_local_tokens(t) for t in synthetic_batch(cfg))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(engine, cfg, batch)
        if i:
            times.append(time.perf_counter() - t0)
    # forward + backward alone: activation memory and what the collectives send
    params = [p for p in engine.module.parameters() if p.requires_grad]
    lm_loss(engine.module, *batch).backward()  # allocates the gradients once
    for p in params:
        p.grad.zero_()
    start = _settle()
    counter.on = True
    lm_loss(engine.module, *batch).backward()
    counter.on = False
    peak = _rss_and_peak()[1] - start
    result = {"step_s": statistics.median(times), "act_bytes": peak,
              "sent_elements": counter.elements}  # fmt: skip
    peaks = torch.tensor([float(peak)])
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    result["act_bytes_max"] = peaks.item()
    if int(os.environ["RANK"]) == 0:
        out.write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver
def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--variant", default="twicing")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2, help="timed steps per launch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", nargs=3, metavar=("OUT", "C", "MODE"), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    overrides = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.groups}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        f"model.vocab_size={args.vocab}",
        f"model.seq_length={args.seq}",
        "model.position_embedding=rope",
        f"model.attention={args.variant}",
        *rest,
    ]
    if args.worker:
        out, c, mode = args.worker
        worker(Path(out), int(c), mode, args.steps, overrides)
        return 0

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    samples: dict[tuple[int, str], list[dict]] = {k: [] for k in CONFIGS}
    print(
        f"{args.variant}, seq {args.seq}, {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads / {args.groups} groups, fp32, 1 sequence per step, "
        f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for c, mode in CONFIGS:
                out = Path(tmp) / f"{c}-{mode}-{r}.json"
                cmd = [sys.executable, "-m", "pretrain.local_launch", "--nproc", str(c),
                       str(Path(__file__).resolve()), "--worker", str(out), str(c), mode,
                       "--steps", str(args.steps), *sys.argv[1:]]  # fmt: skip
                subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
                got = json.loads(out.read_text())
                samples[(c, mode)].append(got)
                print(
                    f"round {r + 1}: C={c} {mode:9s} step {got['step_s']:.2f} s, act "
                    f"{got['act_bytes_max'] / MIB:.0f} MiB, sent "
                    f"{got['sent_elements'] * 4 / MIB / args.layers:.1f} MiB/layer",
                    flush=True,
                )
    d = args.hidden // args.heads
    base = statistics.median(x["act_bytes_max"] for x in samples[CONFIGS[0]])
    print(f"\n{'C':>2} {'mode':9} {'step s':>7} {'act MiB/rank':>12} {'× C=1':>6} {'1/C':>5} "
          f"{'sent MiB/layer':>14} {'derived':>8}")  # fmt: skip
    for c, mode in CONFIGS:
        xs = samples[(c, mode)]
        act = statistics.median(x["act_bytes_max"] for x in xs)
        sent = statistics.median(x["sent_elements"] for x in xs) * 4 / args.layers
        derived = derived_elements(args.variant, mode, c, args.seq, args.heads, args.groups, d) * 4
        print(
            f"{c:>2} {mode if c > 1 else '-':9} "
            f"{statistics.median(x['step_s'] for x in xs):>7.2f} {act / MIB:>12.0f} "
            f"{act / base:>6.2f} {1 / c:>5.2f} {sent / MIB:>14.2f} {derived / MIB:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
