"""Seed attention variants: float64 references, cross-layer state under recompute and across
passes, resume, and configuration errors."""

from __future__ import annotations

import pytest
import torch

from data_prep.base.errors import ConfigError
from model import ModelConfig, build_gpt
from model.attention.neural import NeuralScorer, neural_attention
from model.attention.value_residual import neutreno_attention, value_residual_attention

SEED = torch.seed()


def expand(x, heads):
    r = heads // x.shape[2]
    return torch.stack([x[:, :, i // r] for i in range(heads)], dim=2)


def softmax_ref(q, k, v, scores=None):
    """float64 causal attention with explicit probabilities; GQA by index mapping."""
    q, k, v = (t.double() for t in (q, k, v))
    b, s, h, d = q.shape
    k, v = expand(k, h), expand(v, h)
    if scores is None:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


def qkv(gen, b=2, s=13, h=4, g=2, d=8):
    return (
        torch.randn(b, s, h, d, generator=gen),
        torch.randn(b, s, g, d, generator=gen),
        torch.randn(b, s, g, d, generator=gen),
        torch.randn(b, s, g, d, generator=gen),
    )


def test_neutreno_matches_reference():
    q, k, v, v0 = qkv(torch.Generator().manual_seed(SEED))
    out = neutreno_attention(q, k, v, v0, lam=0.4)
    ref = softmax_ref(q, k, v) + 0.4 * (expand(v0.double(), 4) - expand(v.double(), 4))
    assert rel(out, ref) <= 1e-6, SEED


@pytest.mark.parametrize("lam_first,lam_own", [(0.5, 0.5), (1.0, 0.0), (0.3, 0.9)])
def test_value_residual_matches_reference(lam_first, lam_own):
    q, k, v, v1 = qkv(torch.Generator().manual_seed(SEED + 1))
    out = value_residual_attention(q, k, v, v1, lam_first=lam_first, lam_own=lam_own)
    ref = softmax_ref(q, k, lam_first * v1.double() + lam_own * v.double())
    assert rel(out, ref) <= 1e-6, SEED


def test_neural_attention_matches_a_pairwise_loop():
    """In float64, so the comparison checks the math: unscaled MLP scores of random weights
    reach |50|, where fp32 rounding alone moves the output by ~1e-6."""
    gen = torch.Generator().manual_seed(SEED + 2)
    q, k, v, _ = (t.double() for t in qkv(gen, s=7))
    h, d, e = 4, 8, 4
    w = NeuralScorer(
        *(
            torch.randn(*shape, generator=gen, dtype=torch.float64)
            for shape in [
                (h, d, e),
                (h, d, e),
                (h, e, e),
                (h, e, e),
                (h, e),
                (h, e, e // 2),
                (h, e // 2),
                (h, e // 2),
            ]
        )
    )
    out = neural_attention(q, k, v, w)
    W = {k2: t.double() for k2, t in vars(w).items()}
    kk = expand(k.double(), h)
    scores = torch.empty(2, h, 7, 7, dtype=torch.float64)
    for bi in range(2):
        for hi in range(h):
            for i in range(7):
                for j in range(7):
                    qi = q[bi, i, hi].double() @ W["wq"][hi]
                    kj = kk[bi, j, hi] @ W["wk"][hi]
                    x = torch.cat([qi, kj])
                    w1 = torch.cat([W["w1q"][hi], W["w1k"][hi]])  # [2d′, d′]
                    hid = torch.relu(x @ w1 + W["b1"][hi])
                    hid = torch.relu(hid @ W["w2"][hi] + W["b2"][hi])
                    scores[bi, hi, i, j] = hid @ W["w3"][hi] + 1.7  # any constant cancels
    assert out.dtype == torch.float64
    assert rel(out, softmax_ref(q, k, v, scores=scores)) <= 1e-12, SEED


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        **{
            "num_layers": 3,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "vocab_size": 128,
            "seq_length": 16,
            **kw,
        }
    )


def loss_and_grads(cfg: ModelConfig, tokens):
    torch.manual_seed(11)
    model = build_gpt(cfg)
    model.train()
    pos = torch.arange(tokens.size(1)).expand_as(tokens)
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).mean()
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("variant", ["neutreno", "resformer", "svformer"])
def test_cross_layer_state_is_exact_under_activation_recompute(one_rank, variant):
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(SEED))
    base_loss, base_grads = loss_and_grads(tiny(attention=variant), tokens)
    for recompute in ("selective", "full"):
        loss, grads = loss_and_grads(tiny(attention=variant, recompute=recompute), tokens)
        assert torch.equal(loss, base_loss), recompute
        assert grads.keys() == base_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, base_grads[name], rtol=1e-6, atol=1e-9, msg=name)


def test_cross_layer_variants_really_use_the_first_layer(one_rank):
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(SEED))
    softmax, _ = loss_and_grads(tiny(attention="softmax"), tokens)
    off, _ = loss_and_grads(tiny(attention="neutreno", attention_options={"lambda": 0.0}), tokens)
    on, _ = loss_and_grads(tiny(attention="neutreno"), tokens)
    assert torch.equal(off, softmax) and not torch.equal(on, softmax)
    _, grads = loss_and_grads(tiny(attention="svformer"), tokens)
    qkv_grad = {
        int(n.split(".")[2]): g for n, g in grads.items() if n.endswith("linear_qkv.weight")
    }
    # fused QKV rows per group: [q (2 heads) | k | v] x 8 dims; layers >= 1 never use their V
    v_rows = torch.cat([torch.arange(g * 32 + 24, g * 32 + 32) for g in range(2)])
    assert qkv_grad[0][v_rows].abs().sum() > 0
    assert all(qkv_grad[i][v_rows].abs().sum() == 0 for i in (1, 2))


def test_first_layer_values_do_not_leak_between_passes(one_rank):
    cfg = tiny(attention="resformer")
    torch.manual_seed(3)
    model = build_gpt(cfg).eval()
    holder = model.decoder.layers[1].self_attention.core_attention.first_values
    assert holder is model.decoder.layers[2].self_attention.core_attention.first_values
    seen = []
    model.decoder.layers[0].register_forward_pre_hook(lambda *_: seen.append(holder.value))
    gen = torch.Generator().manual_seed(SEED)
    a, b = (torch.randint(0, 128, (2, 16), generator=gen) for _ in range(2))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        model(a, pos, None)
        out_b = model(b, pos, None)
        torch.manual_seed(3)
        fresh = build_gpt(cfg).eval()(b, pos, None)
    assert seen == [None, None]  # cleared at the start of each forward
    assert torch.equal(out_b, fresh)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"attention": "neutreno", "num_layers": 1},
            r"neutreno mixes the first layer's values.*selects none",
        ),
        ({"attention": "resformer", "attention_layers": [0]}, r"selects none"),
        ({"attention": "neural", "attention_backend": "flash"}, r"'flash' cannot run neural"),
        ({"attention": "neural", "attention_options": {"dim": 3}}, r"even integer >= 2, got 3"),
        (
            {"attention": "neutreno", "attention_options": {"lamda": 0.4}},
            r"unknown option 'lamda'.*lambda",
        ),
        ({"attention": "neutreno", "attention_dropout": 0.1}, r"attention_dropout"),
    ],
)
def test_bad_variant_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)


def test_default_coefficients_are_the_papers_official_values(one_rank):
    """NeuTRENO λ = 0.4 (the official language-modelling config of Nguyen et al., NeurIPS
    2023) and ResFormer λ₁ = λ₂ = 0.5 (Zhou et al., ACL 2025, the official value-residual
    mix): the registry defaults and what a module built without options computes."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from model.attention.first_values import FirstLayerValues
    from model.attention.registry import VARIANTS, core_attention_class

    assert VARIANTS["neutreno"].options == {"lambda": 0.4}
    assert VARIANTS["resformer"].options == {"lambda_first": 0.5, "lambda_own": 0.5}
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )
    q, k, v, v0 = (torch.randn(2, 6, 4, 8, dtype=torch.float64) for _ in range(4))
    for name, expected in (
        ("neutreno", softmax_ref(q, k, v) + 0.4 * (v0 - v)),
        ("resformer", softmax_ref(q, k, 0.5 * v0 + 0.5 * v)),
    ):
        holder = FirstLayerValues()
        module = core_attention_class(name)(
            config, layer_number=2, attn_mask_type=AttnMaskType.causal, first_values=holder
        )
        module.kernel = module.resolve_kernel(q)
        torch.testing.assert_close(module.attention(q, k, v, True, v0), expected)
