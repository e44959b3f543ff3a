"""GPU acceptance in one command: attention correctness and speed per backend, training
throughput and MFU, checkpoint resume, and the train/evaluate entry points.

    python3 benchmarks/gpu/check.py --out DIR            # on a CUDA machine (<= 8 minutes)
    python benchmarks/gpu/check.py --dry-run --out DIR   # the same code at tiny sizes on CPU

Writes ``DIR/gpu_check.json`` (every row, the environment), ``DIR/gpu_check.md`` (the tables) and
``DIR/gpu_check.log`` (the subprocesses' output), and prints the tables last. When megatron-core
or DeepSpeed is not importable, the wheels in ``--wheels`` (``bash benchmarks/gpu/wheels.sh``)
are installed with ``pip install --no-index --no-deps --target SITE`` and SITE is put on
``PYTHONPATH``. Exit code 0 when no row failed, 1 otherwise, 2 when it cannot start.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

#: section -> (title, [(column, row key, format)])
TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "env": ("Environment", [("what", "key", "s"), ("value", "value", "v")]),
    "correctness": (
        "Correctness: bf16 vs float64 (relative Frobenius error; fresh inputs)",
        [
            ("backend", "backend", "s"),
            ("variant", "variant", "s"),
            ("heads q:kv", "heads", "s"),
            ("fwd err", "out_err", ".2e"),
            ("grad err (max q/k/v)", "grad_err", ".2e"),
            ("status", "status", "s"),
            ("note", "note", "s"),
        ],
    ),
    "speed": (
        "Speed: causal attention forward + backward (median of CUDA-event timings)",
        [
            ("backend", "backend", "s"),
            ("seq", "seq", "s"),
            ("head dim", "head_dim", "d"),
            ("batch×heads", "shape", "s"),
            ("softmax ms", "softmax_ms", ".3f"),
            ("twicing ms", "twicing_ms", ".3f"),
            ("twicing/(2×softmax)", "ratio", ".3f"),
            ("softmax TFLOP/s", "softmax_tflops", ".4g"),
            ("twicing TFLOP/s", "twicing_tflops", ".4g"),
            ("status", "status", "s"),
            ("note", "note", "s"),
        ],
    ),
    "auto": (
        "auto's pick against the fastest correct backend (twicing fwd+bwd)",
        [
            ("seq", "seq", "s"),
            ("head dim", "head_dim", "d"),
            ("auto →", "auto", "s"),
            ("fastest correct", "fastest", "s"),
            ("auto / fastest", "auto_vs_fastest", ".3f"),
            ("status", "status", "s"),
        ],
    ),
    "training": (
        "Training: 30 steps, 1 device, ZeRO-1, synthetic tokens (median of steps 11-30)",
        [
            ("shape", "shape", "s"),
            ("variant", "variant", "s"),
            ("tokens/s", "tokens_per_s", ",.0f"),
            ("TFLOP/s", "tflops", ".4g"),
            ("MFU vs 989", "mfu_989", ".1%"),
            ("MFU vs matmul ceiling", "mfu_ceiling", ".1%"),
            ("peak GiB", "peak_gib", ".2f"),
            ("loss @30", "final_loss", ".3f"),
            ("status", "status", "s"),
            ("note", "note", "s"),
        ],
    ),
    "profile": (
        "Where a 1.3B twicing step's time goes (torch.profiler, device time per step)",
        [
            ("what", "what", "s"),
            ("ms per step", "ms", ".2f"),
            ("share of step", "share", ".1%"),
            ("status", "status", "s"),
            ("note", "note", "s"),
        ],
    ),
    "checkpoint": (
        "Checkpoint: save at step 10, resume, compare with an uninterrupted run",
        [("what", "what", "s"), ("result", "detail", "s"), ("status", "status", "s")],
    ),
    "entry": (
        "Entry points as a user runs them",
        [
            ("command", "command", "s"),
            ("result", "detail", "s"),
            ("status", "status", "s"),
            ("note", "note", "s"),
        ],
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, sdpa only")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="output directory")
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/twicing-gpu-check"), help="scratch directory"
    )
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheelhouse (wheels.sh)")
    p.add_argument("--site", type=Path, default=Path("/tmp/twicing-gpu-site"))
    p.add_argument(
        "--budget", type=float, default=470.0, help="seconds; later runs are skipped past it"
    )
    p.add_argument("--seed", type=int, help="input seed (default: fresh)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- packages
def ensure_packages(wheels: Path, site: Path) -> str:
    """Make megatron-core and DeepSpeed importable (install the wheelhouse when missing)."""
    missing = [m for m in ("megatron", "deepspeed") if importlib.util.find_spec(m) is None]
    if not missing:
        return "already installed"
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(
            f"{', '.join(missing)} not importable and no wheels in {wheels}: run "
            "`bash benchmarks/gpu/wheels.sh` on a machine with PyPI and carry .whl/"
        )
    if not (site / ".installed").exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *map(str, found),
        ]
        subprocess.run(cmd, check=True)
        (site / ".installed").write_text("\n".join(w.name for w in found))
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    importlib.invalidate_caches()
    return f"installed {len(found)} wheels into {site}"


def start_jit_build(log: Path) -> subprocess.Popen | None:
    """Compile DeepSpeed's FusedAdam (the ZeRO optimizer on CUDA) while the kernels are timed."""
    code = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT
    )


def env_rows(device, packages: str) -> list[dict]:
    import torch

    from model.attention.backend import flash4_available, flash_available

    def version(name: str) -> str:
        try:
            return importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001
            return f"not importable ({type(e).__name__})"

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "megatron-core": version("megatron.core"),
        "deepspeed": version("deepspeed"),
        "flash-attn (FA2)": flash_available(),
        "flash-attn-4": flash4_available(),
        "packages": packages,
    }
    if device.type == "cuda":
        info["compute capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return [
        {"section": "env", "id": f"env/{k}", "key": k, "value": v, "status": "OK"}
        for k, v in info.items()
    ]


# ----------------------------------------------------------------------------- output
def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        return ""
    if fmt == "s" or isinstance(value, str):
        text = str(value).replace("|", "/").replace("\n", " ")
        return text if len(text) <= 160 else text[:157] + "…"
    if fmt == "v":
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    for section, (title, columns) in TABLES.items():
        mine = [r for r in rows if r["section"] == section]
        lines += [f"### {title}", ""]
        lines.append("| " + " | ".join(c for c, _, _ in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for r in mine:
            lines.append("| " + " | ".join(_cell(r, k, f) for _, k, f in columns) + " |")
        lines.append("")
    failed = [r["id"] for r in rows if r["status"] == "FAIL"]
    lines.append(f"**{len(failed)} failed row(s)**" + (": " + ", ".join(failed) if failed else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    packages = ensure_packages(args.wheels, args.site)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    import attention_check as kernels
    import training_check as training

    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = kernels.DRY if args.dry_run else kernels.FULL
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    jit_log = work / "jit_build.log"
    jit = None if args.dry_run else start_jit_build(jit_log)
    rows: list[dict] = env_rows(device, packages)
    rows.append(
        {"section": "env", "id": "env/seed", "key": "input seed", "value": seed, "status": "OK"}
    )
    # the dry run executes torch SDPA only (auto resolves to it on the CPU)
    run = ("sdpa", "auto") if args.dry_run else tuple(kernels.BACKENDS)

    def section(name: str, fn, *a):
        t = time.monotonic()
        try:
            got = fn(*a)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            import traceback

            traceback.print_exc()
            got = [
                {
                    "section": name,
                    "id": f"{name}/error",
                    "status": "FAIL",
                    "note": f"{type(e).__name__}: {e}",
                }
            ]
        print(f"[check] {name}: {time.monotonic() - t:.1f}s", flush=True)
        rows.extend(got)
        return got

    correct = section("correctness", kernels.correctness, device, sizes, run, seed)
    timed = section("speed", kernels.speed, device, sizes, run, seed)
    section("auto", kernels.auto_pick, device, sizes, timed, correct)
    ceiling_row = section("env", lambda: [kernels.matmul_ceiling(device, sizes)])[0]
    ceiling = ceiling_row.get("value")
    if jit is not None:
        t = time.monotonic()
        try:
            code = jit.wait(timeout=max(1.0, min(300.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            code = None  # still compiling: the first training run waits on its lock
        rows.append(
            {
                "section": "env",
                "id": "env/fused_adam_jit",
                "key": "DeepSpeed FusedAdam JIT build",
                "status": "OK" if code == 0 else "FAIL",
                "value": f"exit {code} (waited {time.monotonic() - t:.0f}s)"
                + ("" if code == 0 else ": " + jit_log.read_text()[-600:]),
            }
        )

    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the device to the training subprocesses
    plan = training.make_plan(args.dry_run, work, log, deadline)
    manifest, evaluation = training.make_data(
        plan, tokens=1_200_000 if not args.dry_run else 40_000, seed=seed
    )
    small, big = plan.shapes
    plan.shapes = (small,)
    section("training", training.throughput, plan, manifest, ceiling)
    section("checkpoint", training.checkpoint_and_entry_points, plan, manifest, evaluation)
    plan.shapes = (big,)
    section("training", training.throughput, plan, manifest, ceiling)
    section("profile", training.profile, plan, big)

    rows.append(
        {
            "section": "env",
            "id": "env/wall",
            "key": "wall time (s)",
            "value": round(time.monotonic() - t0, 1),
            "status": "OK",
        }
    )
    mode = "dry run (CPU, tiny sizes)" if args.dry_run else "GPU run"
    header = f"## GPU check — {mode}"
    text = markdown(rows, header)
    (out / "gpu_check.md").write_text(text)
    report = {"mode": mode, "seed": seed, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(text, flush=True)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
