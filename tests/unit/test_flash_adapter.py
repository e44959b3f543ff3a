"""The flash-attn adapter: exercised on CUDA with flash-attn installed, skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from model.attention.backend import attend, flash_available, resolve_backend
from model.attention.twicing import twicing_attention

needs_flash = pytest.mark.skipif(
    not flash_available(), reason="needs CUDA and the flash-attn package (pip install '.[flash]')"
)


def test_forcing_flash_without_it_is_a_clear_error():
    if flash_available():
        pytest.skip("flash-attn is available here")
    with pytest.raises(RuntimeError, match="backend 'flash' needs CUDA fp16/bf16"):
        attend(
            torch.randn(1, 4, 2, 8),
            torch.randn(1, 4, 2, 8),
            torch.randn(1, 4, 2, 8),
            backend="flash",
        )


def test_auto_falls_back_to_sdpa_for_fp32_cpu():
    assert resolve_backend("auto", torch.randn(1, 2, 2, 8)) == "sdpa"


@pytest.mark.gpu
@needs_flash
@pytest.mark.parametrize("groups", [8, 2])
def test_flash_matches_sdpa_on_cuda(groups):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 257, 8, 64)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (
        torch.randn(2, 257, groups, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(2)
    )
    assert resolve_backend("auto", q) == "flash"
    for fn in (attend, twicing_attention):
        kw = {"backend": "flash"}
        flash = fn(q, k, v, **kw).float()
        sdpa = fn(q.float(), k.float(), v.float(), backend="sdpa")
        err = (flash - sdpa).abs().max() / sdpa.abs().max()
        assert err < 2e-2, f"{fn.__name__}: {err}"


@pytest.mark.gpu
@needs_flash
def test_flash_twicing_gradients_match_sdpa():
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", generator=gen) for _ in range(3))
    grads = {}
    for backend, dtype in (("flash", torch.bfloat16), ("sdpa", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        twicing_attention(*leaves, backend=backend).float().square().sum().backward()
        grads[backend] = [t.grad.float() for t in leaves]
    for f, s in zip(grads["flash"], grads["sdpa"], strict=True):
        assert (f - s).abs().max() / s.abs().max() < 3e-2
