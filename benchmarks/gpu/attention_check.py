"""Attention kernels on the device at hand: correctness against float64, speed, matmul ceiling.

Every function returns table rows (dicts); nothing here prints. Inputs are fresh random tensors
(the seed is reported). Twicing runs through :func:`model.attention.twicing.twicing_attention`
and softmax through :func:`model.attention.backend.attend`, i.e. the model's own seam.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.attention import backend as kernels
from model.attention.backend import BACKENDS, CONCRETE, attend, resolve_backend
from model.attention.twicing import twicing_attention

#: relative (Frobenius) error bounds for bf16 against float64: outputs land ~1e-3..1e-2
OUT_TOL = 2e-2
GRAD_TOL = 3e-2


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the GPU run's, or the dry run's tiny ones (same code, same rows)."""

    correct: tuple[int, int, int, int]  # batch, seq, heads, head_dim
    gqa_groups: int
    seqs: tuple[tuple[str, int], ...]  # (label, seq)
    head_dims: tuple[int, ...]
    tokens: int  # batch × seq per speed problem
    hidden: int  # heads × head_dim per speed problem
    warmup: int
    repeats: int
    matmul: int  # n of the n×n×n ceiling product
    matmul_dtype: torch.dtype


FULL = Sizes(
    correct=(2, 512, 8, 128),
    gqa_groups=2,
    seqs=(("1k", 1024), ("4k", 4096), ("8k", 8192)),
    head_dims=(64, 128),
    tokens=16384,
    hidden=2048,
    warmup=5,
    repeats=25,
    matmul=8192,
    matmul_dtype=torch.bfloat16,
)
DRY = Sizes(
    correct=(1, 64, 4, 16),
    gqa_groups=2,
    seqs=(("1k", 64), ("4k", 128), ("8k", 256)),
    head_dims=(64, 128),
    tokens=128,
    hidden=128,
    warmup=2,
    repeats=20,
    matmul=256,
    matmul_dtype=torch.float32,
)


# ----------------------------------------------------------------------------- reference
def _reference(q, k, v, twicing: bool) -> torch.Tensor:
    """float64 causal attention with A materialised: ``AV`` or ``(2A − A²)V`` (GQA repeated)."""
    h = q.size(2)
    k, v = kernels.repeat_kv(k, h), kernels.repeat_kv(v, h)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    n = q.size(1)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    a = s.softmax(-1)
    av = torch.einsum("bhqk,bkhd->bhqd", a, v)
    out = 2 * av - a @ av if twicing else av
    return out.transpose(1, 2)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = (x.detach().double() - ref.detach()).norm() / ref.detach().norm()
    value = float(err)
    return value if math.isfinite(value) else math.inf


def _run(variant: str, backend: str) -> Callable[..., torch.Tensor]:
    if variant == "twicing":
        return lambda q, k, v: twicing_attention(q, k, v, backend=backend)
    return lambda q, k, v: attend(q, k, v, backend=backend)


def correctness(device: torch.device, sizes: Sizes, run: tuple[str, ...], seed: int) -> list[dict]:
    """Softmax and twicing, forward and q/k/v gradients, bf16 vs float64, MHA and GQA, for every
    backend name (``run``: the names to execute; the rest are reported as skipped)."""
    b, s, h, d = sizes.correct
    rows = []
    probe = torch.empty(1, s, h, d, device=device, dtype=torch.bfloat16)
    for name in BACKENDS:
        try:
            resolved = resolve_backend(name, probe)
            why = None
        except RuntimeError as e:
            resolved, why = None, str(e)
        for heads, groups in (("mha", h), ("gqa", sizes.gqa_groups)):
            for variant in ("softmax", "twicing"):
                row = {
                    "section": "correctness",
                    "id": f"correctness/{name}/{variant}/{heads}",
                    "backend": name if name != "auto" else f"auto→{resolved}",
                    "variant": variant,
                    "heads": f"{heads} {h}:{groups}",
                }
                if name not in run:
                    rows.append({**row, "status": "SKIP", "note": "dry run: torch SDPA only"})
                    continue
                if why is not None:
                    rows.append({**row, "status": "UNAVAILABLE", "note": why})
                    continue
                g = torch.Generator(device=device).manual_seed(seed)
                full = [
                    torch.randn(b, s, n, d, generator=g, device=device, dtype=torch.float64)
                    for n in (h, groups, groups, h)
                ]
                q, k, v, dout = (t.to(torch.bfloat16).double() for t in full)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                ref = _reference(*leaves, twicing=variant == "twicing")
                ref_grads = torch.autograd.grad(ref, leaves, dout)
                test = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
                try:
                    out = _run(variant, name)(*test)
                    grads = torch.autograd.grad(out, test, dout.to(torch.bfloat16))
                except Exception as e:  # noqa: BLE001 - a kernel failure is a result
                    rows.append({**row, "status": "FAIL", "note": f"{type(e).__name__}: {e}"})
                    continue
                out_err = _rel(out, ref.detach())
                grad_err = max(_rel(x, r) for x, r in zip(grads, ref_grads, strict=True))
                ok = out_err <= OUT_TOL and grad_err <= GRAD_TOL  # NaN/inf never passes
                rows.append(
                    {
                        **row,
                        "out_err": out_err,
                        "grad_err": grad_err,
                        "status": "PASS" if ok else "FAIL",
                        "note": f"tolerance {OUT_TOL:g} / {GRAD_TOL:g}",
                    }
                )
    return rows


# ----------------------------------------------------------------------------- timing
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":

        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    timer = _timer(device)
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(repeats))


def attention_flops(b: int, h: int, s: int, d: int) -> float:
    """Causal softmax attention forward + backward: forward ``2·b·h·s²·d`` (QKᵀ and AV, half the
    square), backward 2.5× the forward."""
    return 3.5 * 2 * b * h * s * s * d


def speed(device: torch.device, sizes: Sizes, run: tuple[str, ...], seed: int) -> list[dict]:
    """twicing / (2 × softmax) forward + backward time and TFLOP/s per concrete backend."""
    rows = []
    timer_args = (device, sizes.warmup, sizes.repeats)
    for name in CONCRETE:
        for label, s in sizes.seqs:
            for d in sizes.head_dims:
                h, b = sizes.hidden // d, max(1, sizes.tokens // s)
                row = {
                    "section": "speed",
                    "id": f"speed/{name}/{label}/d{d}",
                    "backend": name,
                    "seq": f"{label} ({s})",
                    "head_dim": d,
                    "shape": f"{b}×{h}",
                }
                if name not in run:
                    rows.append({**row, "status": "SKIP", "note": "dry run: torch SDPA only"})
                    continue
                probe = torch.empty(1, s, h, d, device=device, dtype=torch.bfloat16)
                try:
                    resolve_backend(name, probe)  # type: ignore[arg-type]
                except RuntimeError as e:
                    rows.append({**row, "status": "UNAVAILABLE", "note": str(e)})
                    continue
                g = torch.Generator(device=device).manual_seed(seed)
                q, k, v, dout = (
                    torch.randn(b, s, h, d, generator=g, device=device, dtype=torch.bfloat16)
                    for _ in range(4)
                )
                q, k, v = (t.requires_grad_() for t in (q, k, v))

                def step(variant: str, q=q, k=k, v=v, dout=dout, name=name):
                    out = _run(variant, name)(q, k, v)
                    torch.autograd.grad(out, (q, k, v), dout)

                try:
                    soft = median_seconds(lambda: step("softmax"), *timer_args)
                    twice = median_seconds(lambda: step("twicing"), *timer_args)
                except Exception as e:  # noqa: BLE001
                    rows.append({**row, "status": "FAIL", "note": f"{type(e).__name__}: {e}"})
                    continue
                flops = attention_flops(b, h, s, d)
                rows.append(
                    {
                        **row,
                        "softmax_ms": soft * 1e3,
                        "twicing_ms": twice * 1e3,
                        "ratio": twice / (2 * soft),
                        "softmax_tflops": flops / soft / 1e12,
                        "twicing_tflops": 2 * flops / twice / 1e12,
                        "status": "OK",
                    }
                )
                del q, k, v, dout
    return rows


def auto_pick(device: torch.device, sizes: Sizes, speed_rows: list[dict], correct_rows: list[dict]):
    """Per speed problem: the fastest backend whose correctness rows all passed, against the
    one ``auto`` resolves to."""
    failed = {r["backend"] for r in correct_rows if r["status"] == "FAIL"}
    rows = []
    for label, s in sizes.seqs:
        for d in sizes.head_dims:
            probe = torch.empty(1, s, sizes.hidden // d, d, device=device, dtype=torch.bfloat16)
            auto = resolve_backend("auto", probe)
            timed = [
                r
                for r in speed_rows
                if r["seq"].startswith(f"{label} ") and r["head_dim"] == d and r["status"] == "OK"
            ]
            good = [r for r in timed if r["backend"] not in failed]
            row = {
                "section": "auto",
                "id": f"auto/{label}/d{d}",
                "seq": f"{label} ({s})",
                "head_dim": d,
                "auto": auto,
            }
            if not good:
                rows.append({**row, "status": "SKIP", "note": "no correct backend was timed"})
                continue
            best = min(good, key=lambda r: r["twicing_ms"])
            mine = next((r for r in timed if r["backend"] == auto), None)
            rows.append(
                {
                    **row,
                    "fastest": best["backend"],
                    "auto_vs_fastest": mine["twicing_ms"] / best["twicing_ms"] if mine else None,
                    "status": "OK" if mine is not None else "SKIP",
                    "note": "twicing fwd+bwd time of auto's pick / the fastest correct one",
                }
            )
    return rows


def matmul_ceiling(device: torch.device, sizes: Sizes) -> dict:
    """Achieved TFLOP/s of one n×n×n matrix product (bf16 on the GPU): the MFU ceiling."""
    n, dt = sizes.matmul, sizes.matmul_dtype
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dt) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, sizes.warmup, sizes.repeats)
    return {
        "section": "env",
        "id": "env/matmul_ceiling",
        "key": f"matmul ceiling ({n}³ {str(dt).removeprefix('torch.')}, median)",
        "value": 2 * n**3 / seconds / 1e12,
        "status": "OK",
    }
