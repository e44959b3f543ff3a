"""Attention entropy diagnostic: the formula on constructed logits, and that each variant's
``attention_logits`` are the map its forward pass really uses (so the probe measures that map)."""

from __future__ import annotations

import math

import pytest
import torch

from model import ModelConfig, build_gpt
from model.attention.backend import repeat_kv
from model.attention.neural import NeuralCoreAttention
from model.attention.softmax import SoftmaxCoreAttention
from model.attention.twicing import TwicingCoreAttention
from pretrain.evaluation.attention_entropy import AttentionEntropyProbe, causal_entropy

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run; printed on failure


def test_uniform_attention_has_the_ceiling_entropy():
    entropy, normalised = causal_entropy(torch.zeros(2, 3, 9, 9))
    ceiling = torch.tensor([math.log(i + 1) for i in range(9)], dtype=torch.float64)
    torch.testing.assert_close(entropy, ceiling.expand(2, 3, 9), rtol=1e-6, atol=1e-7)
    assert normalised[..., 0].isnan().all()
    torch.testing.assert_close(normalised[..., 1:], torch.ones(2, 3, 8, dtype=torch.float64))
    entropy, _ = causal_entropy(torch.zeros(1, 1, 9, 9), skip=4)
    torch.testing.assert_close(entropy[0, 0], ceiling[4:], rtol=1e-6, atol=1e-7)


def test_one_hot_attention_has_zero_entropy():
    logits = torch.full((1, 1, 6, 6), -1e4)
    logits[..., 0] = 0.0  # every query looks only at the first token
    entropy, normalised = causal_entropy(logits)
    assert entropy.abs().max() < 1e-6 and normalised[..., 1:].abs().max() < 1e-6


def test_entropy_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(SEED)
    logits = torch.randn(2, 3, 11, 11, generator=g) * 3
    entropy, _ = causal_entropy(logits, skip=2)
    for b in range(2):
        for h in range(3):
            for i in range(2, 11):
                row = logits[b, h, i, : i + 1].double()
                p = torch.exp(row - torch.logsumexp(row, 0))
                want = -(p * p.log()).sum()
                assert abs(entropy[b, h, i - 2] - want) <= 1e-5 * max(1.0, float(want)), SEED


CASES = {
    "softmax": (dict(attention="softmax"), SoftmaxCoreAttention),
    "twicing": (dict(attention="twicing"), TwicingCoreAttention),
    "neural": (dict(attention="neural", attention_layers="first:1"), NeuralCoreAttention),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_are_the_map_the_forward_pass_uses(one_rank, case):
    kw, kind = CASES[case]
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        seq_length=12,
        **kw,
    )
    torch.manual_seed(SEED % 1000)
    model = build_gpt(cfg).eval()
    seen: list[tuple] = []

    def capture(module, args, kwargs, output):
        q, k, v = (t.transpose(0, 1) for t in args[:3])  # [b, s, h, d]
        seen.append((module, q, k, v, output))

    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    handles = [c.register_forward_hook(capture, with_kwargs=True) for c in cores]
    probe = AttentionEntropyProbe(model, skip=1)
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        model(tokens, torch.arange(12).expand_as(tokens), None)
    for h in handles:
        h.remove()
    probe.remove()
    assert isinstance(cores[0], kind)

    expected = []
    for module, q, k, v, output in seen:
        logits = module.attention_logits(q, k).double()
        future = torch.ones(12, 12, dtype=torch.bool).triu(1)
        a = logits.masked_fill(future, float("-inf")).softmax(-1)  # [b, h, s, s]
        vh = repeat_kv(v, q.size(2)).double().permute(0, 2, 1, 3)  # [b, h, s, d]
        av = a @ vh
        out = 2 * av - a @ av if isinstance(module, TwicingCoreAttention) else av
        got = output.double().view(12, 3, 4, -1).permute(1, 2, 0, 3)
        assert (out - got).abs().max() <= 1e-5 * out.abs().max(), (type(module).__name__, SEED)
        h = -(a * a.clamp_min(1e-300).log()).sum(-1)[..., 1:]
        expected.append(float(h.mean()))
    got = probe.result()["entropy"]
    assert got == pytest.approx(expected, rel=1e-6), SEED
