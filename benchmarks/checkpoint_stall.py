"""Training time lost per checkpoint save: synchronous vs ``checkpoint.async_save``, side by side.

One process trains a GPT whose checkpoint holds ≥ 1 GB (fp32 weights, ZeRO-1's fp32 partition
and Adam's two moments: 16 bytes per parameter) with the real ``CheckpointManager``. Each round
saves once with each mode (alternating) and then trains ``--steps-after`` steps, calling the
manager's hooks where the trainer does (``before_update`` before every optimizer step, ``poll``
after it):

- **blocked**: the seconds the training loop stood still because of the save: the ``save``
  call, plus any wait for staging before the next optimizer update, plus (async) the wait for
  the writer when it had not finished by the last step of the round;
- **overlap step**: the median time of the steps during which a background write was running,
  against the median step time with no save in flight (**quiet step**);
- **write MB/s**: bytes written per second of writing (sync: the whole save; async: the
  background writer's time).

Medians over ``--rounds``. The 2-core machine shares its second core between the writer and
everything else (one training thread here).

    python benchmarks/checkpoint_stall.py [--rounds 3] [--layers 16 --hidden 512] [--fsync]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _engine import config, engine_for, init_once, synthetic_batch  # noqa: E402
from _timing import with_malloc_tuning  # noqa: E402


def main() -> int:
    with_malloc_tuning()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-after", type=int, default=4)
    p.add_argument("--fsync", action="store_true", help="durable writes (checkpoint.fsync)")
    p.add_argument("--work", type=Path, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(1)
    init_once()
    cfg = config(
        [
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            "model.num_attention_heads=8",
            f"model.ffn_hidden_size={4 * args.hidden}",
            f"model.vocab_size={args.vocab}",
            "model.seq_length=128",
            "training.micro_batch_size=2",
            "training.global_batch_size=2",
            "parallel.zero_stage=1",
        ]
    )
    from model.tp_layout import layout_of
    from pretrain.checkpoint.manager import CheckpointManager
    from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
    from pretrain.parallel import rng
    from pretrain.parallel.engine import lm_loss
    from pretrain.train_config import CheckpointConfig

    engine = engine_for(cfg)
    batch = synthetic_batch(cfg)
    work = args.work or Path(tempfile.mkdtemp(prefix="twicing-stall-"))
    managers = {
        mode: CheckpointManager(
            work / mode,
            CheckpointConfig(keep_last=1, async_save=mode == "async", fsync=args.fsync),
        )
        for mode in ("sync", "async")
    }
    state = TrainerState(
        step=1,
        consumed_samples=2,
        config=cfg.to_dict(),
        topology=Topology(tensor=1, data=1, zero_stage=1),
        tp_layout={k: v.to_json() for k, v in layout_of(engine.module).items()},
        tokenizer=TokenizerInfo("tokenizer.model", "0" * 64, cfg.model.vocab_size, 0),
    )

    def step(manager) -> float:
        t0 = time.perf_counter()
        loss = lm_loss(engine, *batch)
        engine.backward(loss)
        manager.before_update()
        engine.step()
        manager.poll()
        return time.perf_counter() - t0

    step(managers["sync"])  # optimizer state exists from here on
    results: dict[str, dict[str, list[float]]] = {
        m: {"blocked": [], "overlap": [], "quiet": [], "mbps": []} for m in managers
    }
    number = 1
    for _ in range(args.rounds + 1):  # the first round warms up (allocations, page cache)
        for mode, manager in managers.items():
            number += 1
            t0 = time.perf_counter()
            manager.save(engine, number, state, rng.capture())
            blocked = time.perf_counter() - t0
            pending = manager.pending
            overlap, quiet = [], []
            for _ in range(args.steps_after):
                busy = manager.pending is not None
                waited = pending.staging_waited if busy else 0.0
                seconds = step(manager)
                if busy:  # the step's own time, without its wait for staging (counted as blocked)
                    overlap.append(seconds - (pending.staging_waited - waited))
                else:
                    quiet.append(seconds)
            if manager.pending is not None:  # the writer outlasted the round: the loop waits
                t1 = time.perf_counter()
                manager.finish()
                blocked += time.perf_counter() - t1
            if pending is not None:  # async: plus the waits for staging before an update
                blocked += pending.staging_waited
                seconds_written, written = pending.write_seconds, pending.bytes_written
            else:
                seconds_written = blocked
                tag = work / mode / f"step_{number:08d}"
                written = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
            r = results[mode]
            r["blocked"].append(blocked)
            r["overlap"] += overlap
            r["quiet"] += quiet
            r["mbps"].append(written / max(seconds_written, 1e-9) / 2**20)
            size = written
        if _ == 0:
            for r in results.values():
                for v in r.values():
                    v.clear()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    n = sum(p.numel() for p in engine.module.parameters())
    med = {m: {k: statistics.median(v) if v else float("nan") for k, v in r.items()}
           for m, r in results.items()}  # fmt: skip
    print(
        f"{n / 1e6:.1f}M parameters, ZeRO-1, fp32, checkpoint {size / 2**30:.2f} GiB, "
        f"fsync {'on' if args.fsync else 'off'}; medians of {args.rounds} rounds (1 warm-up), "
        f"{args.steps_after} steps after each save, 1 training thread"
    )
    print(f"{'mode':<6} {'blocked s':>10} {'quiet step s':>13} {'overlap step s':>15} "
          f"{'write MB/s':>11}")  # fmt: skip
    for mode in ("sync", "async"):
        m = med[mode]
        print(
            f"{mode:<6} {m['blocked']:10.3f} {m['quiet']:13.3f} {m['overlap']:15.3f} "
            f"{m['mbps']:11.0f}"
        )
    ratio = med["sync"]["blocked"] / med["async"]["blocked"]
    slower = med["async"]["overlap"] / med["async"]["quiet"] - 1
    print(
        f"time blocked per save: sync / async = {ratio:.1f}x (target >= 5x: "
        f"{'met' if ratio >= 5 else 'missed'}); steps overlapping a background write "
        f"{100 * slower:+.0f}% vs quiet steps (target within 10%: "
        f"{'met' if abs(slower) <= 0.10 else 'missed'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
