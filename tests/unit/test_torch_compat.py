"""Pins torch's private CPU flash-attention primitives (``model/attention/torch_compat.py``):
if torch renames them or changes their signatures, this fails instead of the fused CPU paths
silently falling back to SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import torch_compat


def test_the_private_cpu_flash_primitives_exist():
    assert torch_compat.available(), (
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_backward) are gone: "
        "update model/attention/torch_compat.py"
    )


@pytest.mark.parametrize("causal", [True, False])
def test_forward_backward_equal_sdpa_and_its_autograd(causal):
    """Our call of each primitive (argument order, ``scale`` keyword, the log-sum-exp it
    returns) gives SDPA's output and the gradients autograd takes through SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, requires_grad=True) for _ in range(3))
    scale = 0.3
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    with torch.no_grad():
        out, lse = torch_compat.cpu_forward(q, k, v, causal, scale)
        logits = (q @ k.transpose(-1, -2) * scale).double()
        if causal:
            logits.masked_fill_(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=1e-5, atol=1e-5)
        grads = torch_compat.cpu_backward(dout, q, k, v, out, lse, causal, scale)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
