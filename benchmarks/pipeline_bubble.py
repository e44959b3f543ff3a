"""Pipeline step time, PP=2 vs PP=1 at equal global batch, beside the ideal 1F1B bubble.

For m = P, 4·P and 8·P micro-batches per step, PP=1 (one rank, m accumulated micro-batches) and
PP=2 (two ranks, megatron-core's 1F1B schedule over m micro-batches) train the same GPT on
synthetic tokens; each rank is one process with one thread, so PP=2 has twice the compute. The
two sides alternate, round after round, in one run; each side's number is the median over
rounds of its median step time. Printed: both times, the speed-up, the ideal speed-up
P·m/(m+P−1) (the bubble (P−1)/(m+P−1) idles each rank for that fraction of the step) and the
bubble the measurement implies, 1 − speed-up/P.

    python benchmarks/pipeline_bubble.py [--rounds 3] [--steps 4] [--layers 8 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PP = 2


def _worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from pretrain.parallel import distributed
    from pretrain.parallel.engine import build_engine, lm_loss
    from pretrain.parallel.launch_env import launch_env
    from pretrain.parallel.pipeline_schedule import PipelineStep
    from pretrain.train_config import ParallelConfig, load_config
    from pretrain.training.data import Batch

    world = int(os.environ["WORLD_SIZE"])
    micro, m = args.micro, args.microbatches
    cfg = load_config(
        None,
        [
            "run_dir=/tmp/twicing-bench", "data.manifest=unused",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.hidden // 64}", f"model.seq_length={args.seq}",
            "model.vocab_size=8192", "model.attention=twicing",
            f"training.micro_batch_size={micro}", f"training.global_batch_size={micro * m}",
            f"parallel.pipeline={world}", "parallel.zero_stage=1",
        ],
    )  # fmt: skip
    distributed.init(launch_env(), ParallelConfig(pipeline=world), 10)
    torch.manual_seed(0)
    engine = build_engine(cfg, world).engine
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(m):
        t = torch.randint(0, 8192, (micro, args.seq + 1), generator=g)
        pos = torch.arange(args.seq).expand(micro, args.seq)
        batches.append(Batch(t[:, :-1], t[:, 1:], torch.ones(micro, args.seq), pos))
    pipe = PipelineStep(engine, engine, args.seq, micro) if world > 1 else None

    def step() -> None:
        if pipe is not None:
            pipe.forward_backward(batches)
            pipe.sum_tied_gradients(1)
        else:
            for b in batches:
                engine.backward(lm_loss(engine, b.tokens, b.position_ids, b.labels, b.loss_mask))
        engine.step()

    times = []
    for i in range(args.steps + 1):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step()
        torch.distributed.barrier()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"step_s": statistics.median(times)}))
    distributed.shutdown()


def _launch(ranks: int, args: argparse.Namespace, m: int) -> float:
    from pretrain.parallel.launch_env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        port = str(free_port())
        argv = [
            sys.executable, __file__, "--worker", "--out", str(out), "--microbatches", str(m),
            "--steps", str(args.steps), "--layers", str(args.layers), "--hidden", str(args.hidden),
            "--seq", str(args.seq), "--micro", str(args.micro),
        ]  # fmt: skip
        procs = []
        for rank in range(ranks):
            env = {
                **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                "LOCAL_WORLD_SIZE": str(ranks), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            }  # fmt: skip
            procs.append(
                subprocess.Popen(
                    argv,
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
            )
        for p in procs:
            _, err = p.communicate(timeout=1800)
            if p.returncode:
                raise SystemExit(f"worker failed ({p.returncode}):\n{err[-3000:]}")
        return json.loads(out.read_text())["step_s"]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    print(
        f"twicing GPT {args.layers} layers × {args.hidden}, seq {args.seq}, micro-batch "
        f"{args.micro}, ZeRO-1, 1 thread per rank; PP=1 on 1 rank vs PP={PP} on {PP} ranks; "
        f"{args.rounds} alternating rounds of {args.steps} timed steps"
    )
    print(
        f"{'m':>4} {'PP1 s/step':>11} {'PP2 s/step':>11} {'speed-up':>9} {'ideal':>7} "
        f"{'bubble ideal':>13} {'bubble measured':>16}"
    )
    for m in (PP, 4 * PP, 8 * PP):
        samples: dict[int, list[float]] = {1: [], PP: []}
        for _ in range(args.rounds):
            for ranks in (1, PP):
                samples[ranks].append(_launch(ranks, args, m))
        one, two = (statistics.median(samples[r]) for r in (1, PP))
        speedup = one / two
        ideal_bubble = (PP - 1) / (m + PP - 1)
        print(
            f"{m:>4} {one:>11.3f} {two:>11.3f} {speedup:>8.2f}× {PP * (1 - ideal_bubble):>6.2f}× "
            f"{100 * ideal_bubble:>12.1f}% {100 * (1 - speedup / PP):>15.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
