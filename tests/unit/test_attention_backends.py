"""Attention backend choice: every name resolves or fails clearly; twicing runs one kernel twice."""

from __future__ import annotations

import pytest
import torch

from data_prep.base.errors import ConfigError
from model.attention import backend as kernels
from model.attention.backend import BACKENDS, attend, resolve_backend
from model.attention.twicing import twicing_attention
from model.model_config import ModelConfig


def _qkv(groups: int = 2, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 16, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 16, groups, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v):
    """float64 causal softmax attention, GQA by repetition."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (kernels.repeat_kv(t, q.size(2)) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.size(-1) ** 0.5
    s = s.masked_fill(torch.ones(q.size(1), k.size(1), dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_the_names():
    assert set(BACKENDS) == {"auto", "flash", "sdpa", "cudnn", "sdpa-flash", "efficient", "flash4"}
    assert kernels.HOPPER_ORDER[0] == "cudnn"  # auto's first choice on Hopper (docstring)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["auto", "sdpa", "sdpa-flash"])
def test_cpu_backends_resolve_and_match_the_reference(name, dtype):
    q, k, v = _qkv(dtype=dtype)
    assert resolve_backend(name, q) == ("sdpa" if name == "auto" else name)
    out = attend(q, k, v, backend=name)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _reference(q, k, v), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "name, message",
    [
        ("cudnn", r"'cudnn' is torch SDPA's cuDNN kernel, which needs a CUDA device"),
        ("efficient", r"'efficient' is torch SDPA's memory-efficient kernel, which needs a CUDA"),
        ("flash", r"backend 'flash' needs CUDA fp16/bf16 tensors and the flash-attn package"),
    ],
)
def test_cuda_only_backends_fail_clearly_on_cpu(name, message):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=message):
        resolve_backend(name, q)
    with pytest.raises(RuntimeError, match=message):
        twicing_attention(q, k, v, backend=name)


def test_flash4_names_the_missing_package():
    if kernels.flash4_available():
        pytest.skip("flash-attn-4 is installed here")
    q, _, _ = _qkv(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"'flash4' needs the flash-attn-4 package"):
        resolve_backend("flash4", q)


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not one of"):
        attend(q, k, v, backend="triton")  # type: ignore[arg-type]


def test_config_accepts_every_name_and_rejects_others():
    for name in BACKENDS:
        assert ModelConfig(attention_backend=name).attention_backend == name
    with pytest.raises(ConfigError, match=r"model\.attention_backend.*unknown backend 'fa3'"):
        ModelConfig(attention_backend="fa3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'cudnn' cannot run neural"):
        ModelConfig(attention="neural", attention_backend="cudnn")


def _record(monkeypatch, names):
    """Wrap the kernels so each call appends its backend name to the returned list."""
    calls: list[str] = []
    for name in names:
        real = kernels.KERNELS[name] if name in ("sdpa", "sdpa-flash") else kernels.KERNELS["sdpa"]

        def kernel(*args, _name=name, _real=real):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setitem(kernels.KERNELS, name, kernel)
    return calls


def test_twicing_runs_both_passes_on_one_named_backend(monkeypatch):
    """The two-call path (float64 skips the fused CPU function), GQA: the first pass has 2
    key/value heads, the second 4 (keys repeated to the query heads); both run one kernel."""
    calls = _record(monkeypatch, ["sdpa", "sdpa-flash"])
    q, k, v = (t.requires_grad_() for t in _qkv(groups=2, dtype=torch.float64))
    out = twicing_attention(q, k, v, backend="sdpa-flash")
    out.square().sum().backward()
    assert calls == ["sdpa-flash", "sdpa-flash"]
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize(
    "capability, usable, expected",
    [((9, 0), {"cudnn", "sdpa-flash"}, "cudnn"), ((8, 0), {"cudnn", "sdpa-flash"}, "sdpa-flash")],
)
def test_auto_picks_one_kernel_for_both_twicing_passes(monkeypatch, capability, usable, expected):
    """``auto`` on a (simulated) CUDA device resolves on q alone, so the GQA first pass and the
    full-width second pass get the same kernel; Hopper prefers cuDNN."""
    q, k, v = _qkv(groups=2, dtype=torch.bfloat16)
    ref = twicing_attention(q.double(), k.double(), v.double(), backend="sdpa")
    monkeypatch.setattr(kernels, "_on_cuda", lambda q: True)
    monkeypatch.setattr(kernels, "_capability", lambda q: capability)
    monkeypatch.setattr(
        kernels, "unavailable_reason", lambda name, q, p=0.0: None if name in usable else "no"
    )
    monkeypatch.setattr(kernels, "cpu_kernel_applies", lambda backend, q: False)
    calls = _record(monkeypatch, ["cudnn", "sdpa-flash", "efficient", "flash", "flash4"])
    assert resolve_backend("auto", q) == expected
    out = twicing_attention(q, k, v, backend="auto")
    assert calls == [expected, expected]
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


def test_cpu_twicing_fused_path_serves_auto_sdpa_and_sdpa_flash():
    q, _, _ = _qkv()
    for name in ("auto", "sdpa", "sdpa-flash"):
        assert kernels.cpu_kernel_applies(name, q)
    assert not kernels.cpu_kernel_applies("cudnn", q)


def test_the_kernel_is_resolved_once_per_module(one_rank, monkeypatch):
    """Two forwards of a 2-layer twicing GPT (two passes per layer each) resolve the backend
    twice in all: once per attention module, not in every ``attend`` call."""
    from model import ModelConfig, build_gpt
    from model.attention import base

    calls = []
    real = base.resolve_backend
    monkeypatch.setattr(base, "resolve_backend", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(kernels, "resolve_backend", lambda *a: pytest.fail("resolved in attend"))
    torch.manual_seed(0)
    model = build_gpt(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2))
    tokens = torch.randint(0, 1024, (2, 16))
    for _ in range(2):
        model(tokens, torch.arange(16).expand(2, 16), None).sum().backward()
    assert calls == ["auto", "auto"]


@pytest.mark.parametrize(("s_q", "s_k", "mask_free_from"), [
    (4, 10, 0), (7, 8, 0), (32, 96, 0), (32, 96, 32 * 96 + 1), (1024, 1056, None),
])  # fmt: skip
def test_cpu_bottom_right_attention_without_a_mask_is_exact(s_q, s_k, mask_free_from, monkeypatch):
    """The last ``s_q`` of ``s_k`` positions (context-parallel chunks, chunked prefill) on the
    CPU flash primitives, split at the queries and merged by log-sum-exp (from
    ``MASK_FREE_FROM`` positions; below it, and for the case just under it, the masked call):
    output and every gradient equal a float64 explicit-mask reference (GQA 4 heads over 2
    groups). The last case takes the mask-free path at the shipped threshold."""
    from model.attention import backend
    from model.attention.backend import attend, repeat_kv

    if mask_free_from is not None:
        monkeypatch.setattr(backend, "MASK_FREE_FROM", mask_free_from)
    mask_free = s_q * s_k >= backend.MASK_FREE_FROM
    calls = []
    real = backend._BottomRightCPU.apply
    monkeypatch.setattr(backend._BottomRightCPU, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(s_q)
    q = torch.randn(2, s_q, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, s_k, 2, 16, requires_grad=True) for _ in range(2))
    out = attend(q, k, v, causal=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q64, repeat_kv(k64, 4)) / 4
    allowed = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", weights, repeat_kv(v64, 4))
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert bool(calls) == mask_free
