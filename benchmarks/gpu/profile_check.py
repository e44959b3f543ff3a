"""Where one training step's time goes: torch.profiler over a few steps of a preset + overrides,
device time summed by kernel category (attention, matmul, optimizer, communication, other).

    python benchmarks/gpu/profile_check.py --config configs/gpt_1p3b.yaml --out P.json key=value ...

One process, world size 1, synthetic batches (``benchmarks/_engine.py``, the steps exactly as the
trainer takes them at gradient accumulation 1). Run by ``check.py`` in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

#: first match wins; CUDA kernel names on a GPU, aten op names on the CPU
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention|scaled_dot_product", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|aten::(mm|addmm|bmm|matmul)$")),
    ("optimizer", re.compile(r"adam|multi_tensor|multitensor", re.I)),
    ("communication", re.compile(r"nccl|all_reduce|allreduce|gloo", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch

    from pretrain.train_config import load_config

    from _engine import engine_for, init_once, synthetic_batch, train_step

    cfg = load_config(args.config, ["data.manifest=unused", *args.overrides])
    init_once(cfg.parallel.tensor)
    engine = engine_for(cfg)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    batch = tuple(t.to(device) for t in synthetic_batch(cfg))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step(engine, cfg, batch)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(engine, cfg, batch)
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for evt in prof.key_averages():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = evt.self_cuda_time_total
        else:
            if not evt.key.startswith("aten::") and category(evt.key) == "other":
                continue
            us = evt.self_cpu_time_total
        seconds = us / 1e6 / args.steps
        if seconds <= 0:
            continue
        totals[category(evt.key)] = totals.get(category(evt.key), 0.0) + seconds
        top.append((seconds, evt.key))
    busy = sum(totals.values())
    report = {
        "config": str(args.config),
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_seconds": wall,
        "busy_seconds": busy,
        "categories": {k: totals[k] for k in sorted(totals, key=totals.get, reverse=True)},
        "top_kernels": [{"name": n[:120], "seconds": s} for s, n in sorted(top, reverse=True)[:12]],
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("step_seconds", "busy_seconds", "categories")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
