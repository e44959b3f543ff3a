"""Incremental decoding (TP=1, in-process, real megatron-core): the bottom-right causal kernel,
twicing's first-pass (O1) cache identity, every variant's cached logits against the full forward
(one-shot, chunked and left-padded prefill), the cache layout, the generation loop and sampling.
The TP=2 versions are in tests/integration/test_generate.py."""

from __future__ import annotations

import pytest
import torch
from decoding_cases import CASES, build, check_case, config, tokens

TOL = 1e-5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference_weights(q, k, mask=None) -> torch.Tensor:
    """softmax(q·kᵀ/√d) with bottom-right causal masking, ``[b, h, s_q, s_k]`` (float64)."""
    from model.attention.backend import repeat_kv

    k = repeat_kv(k, q.size(2))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / q.size(-1) ** 0.5
    s_q, s_k = q.size(1), k.size(1)
    allowed = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
    if mask is not None:
        allowed = allowed & mask
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def test_attend_aligns_causal_queries_bottom_right_and_applies_a_key_mask():
    from model.attention.backend import attend, repeat_kv

    q, k, v = _rand(2, 9, 4, 8, seed=0), _rand(2, 9, 2, 8, seed=1), _rand(2, 9, 2, 8, seed=2)
    full = attend(q, k, v, causal=True)
    for s in (1, 3, 9):  # the last s queries against all keys = the tail of the full attention
        torch.testing.assert_close(attend(q[:, -s:], k, v, causal=True), full[:, -s:])
    mask = torch.ones(2, 1, 4, 9, dtype=torch.bool)
    mask[0, :, :, :3] = False  # row 0: the first 3 keys are padding
    ref = torch.einsum("bhij,bjhd->bihd", _reference_weights(q[:, -4:], k, mask), repeat_kv(v, 4))
    torch.testing.assert_close(attend(q[:, -4:], k, v, causal=True, mask=mask), ref)
    with pytest.raises(ValueError, match="seq_q <= seq_k"):
        attend(q, k[:, :5], v[:, :5], causal=True)


def test_twicing_first_pass_cache_gives_exactly_two_a_minus_a_squared(one_rank):
    """The real decode path (``TwicingCoreAttention.decode`` over a ``DecodeContext``), one token
    at a time: out_t = 2·o1_t − Σ_{j≤t} A_tj·o1_j with o1 cached as it is produced equals
    (2A − A²)V of the whole sequence (float64, GQA: 4 query heads over 2 groups)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from model.attention.backend import repeat_kv
    from model.attention.twicing import TwicingCoreAttention
    from model.inference.context import DecodeContext

    q, k, v = _rand(2, 10, 4, 8, seed=3), _rand(2, 10, 2, 8, seed=4), _rand(2, 10, 2, 8, seed=5)
    a = _reference_weights(q, k)
    reference = torch.einsum("bhij,bjhd->bihd", 2 * a - a @ a, repeat_kv(v, 4))
    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        use_cpu_initialization=True, attention_dropout=0.0,
    )  # fmt: skip
    module = TwicingCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    module.kernel = module.resolve_kernel(q)
    ctx = DecodeContext(2, 10)
    outs = []
    for t in range(10):
        outs.append(module.decode(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], ctx, None))
        ctx.advance(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), reference)
    o1 = ctx.extra[(1, "o1")]  # the first-pass cache: A·V row by row, at query-head width
    torch.testing.assert_close(o1, torch.einsum("bhij,bjhd->bihd", a, repeat_kv(v, 4)))


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_equals_the_full_forward(one_rank, name):
    """Prefill 10 + 6 single-token steps, chunked prefill (3 at a time) and a left-padded batch
    of prompts of 6/11/16 tokens all give the full forward's logits (fp32, <= 1e-5 relative)."""
    errors = check_case(name)
    assert max(errors.values()) <= TOL, errors


def test_cache_layout_per_variant(one_rank):
    """K/V in megatron's cache at query-group width; O1 only in twicing layers, at query-head
    width; value-residual variants add no cache of their own (layer 0's V cache is V¹)."""
    from model.inference.context import DecodeContext
    from model.inference.generation import prefill

    x = tokens(3, 8)
    for name, o1_layers in (("twicing-all-gqa", [1, 2, 3]), ("twicing-last1", [3])):
        model, cfg = build(name), config(name)
        ctx = DecodeContext(3, 20)
        prefill(model, ctx, x)
        assert sorted(layer for layer, _ in ctx.extra) == o1_layers
        for (_, what), o1 in ctx.extra.items():
            assert what == "o1"
            assert o1.shape == (3, 20, cfg.num_attention_heads, cfg.head_dim)
        k_cache, v_cache = ctx.key_value_memory_dict[1]
        assert k_cache.shape == v_cache.shape == (20, 3, cfg.query_groups, cfg.head_dim)
    ctx = DecodeContext(3, 20)
    prefill(build("neutreno-gqa"), ctx, x)
    assert ctx.extra == {} and len(ctx.key_value_memory_dict) == 3


@pytest.mark.parametrize("name", ["twicing-all-gqa", "neutreno-gqa", "neural-gqa"])
def test_greedy_generation_is_the_same_with_and_without_the_cache(one_rank, name):
    from model.inference.generation import generate

    model, cfg = build(name), config(name)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (3, 9, 5)]
    kw = dict(max_new_tokens=12, eod=-1, vocab_size=cfg.vocab_size, context_length=cfg.seq_length)
    cached = generate(model, prompts, **kw)
    chunked = generate(model, prompts, prefill_chunk=4, **kw)
    recomputed = generate(model, prompts, use_cache=False, **kw)
    alone = [generate(model, [p], **kw)[0] for p in prompts]
    ids = [[g.token_ids for g in run] for run in (cached, chunked, recomputed, alone)]
    assert ids[0] == ids[1] == ids[2] == ids[3]
    assert all(len(g.token_ids) == 12 and g.finish_reason == "length" for g in cached)
    assert [g.prompt_ids for g in cached] == prompts


def test_generation_stops_at_eod_and_at_the_context(one_rank):
    from model.inference.generation import generate

    model, cfg = build("twicing-last1"), config("twicing-last1")
    prompt = tokens(1, 5)[0].tolist()
    kw = dict(vocab_size=cfg.vocab_size, context_length=cfg.seq_length)
    free = generate(model, [prompt], max_new_tokens=6, eod=-1, **kw)[0]
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    ended = generate(model, [prompt], max_new_tokens=6, eod=stop, **kw)[0]
    assert ended.token_ids == free.token_ids[:first] and ended.finish_reason == "eod"
    full = generate(model, [tokens(1, 28)[0].tolist()], max_new_tokens=50, eod=-1, **kw)[0]
    assert len(full.token_ids) == cfg.seq_length - 28 and full.finish_reason == "length"
    with pytest.raises(ValueError, match="no room"):
        generate(model, [list(range(32))], max_new_tokens=1, eod=-1, **kw)


def test_seeded_sampling_is_reproducible(one_rank):
    from model.inference.generation import generate
    from model.inference.sampling import Sampling

    model, cfg = build("twicing-all-gqa"), config("twicing-all-gqa")
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (4, 7)]
    kw = dict(max_new_tokens=10, eod=-1, vocab_size=cfg.vocab_size, context_length=32)
    sampling = Sampling(temperature=1.5, top_k=40, top_p=0.95)
    runs = [generate(model, prompts, sampling=sampling, seed=s, **kw) for s in (3, 3, 4)]
    ids = [[g.token_ids for g in r] for r in runs]
    assert ids[0] == ids[1] != ids[2]
    recomputed = generate(model, prompts, sampling=sampling, seed=3, use_cache=False, **kw)
    assert [g.token_ids for g in recomputed] == ids[0]


def test_sampling_filters_and_their_errors():
    from model.inference.sampling import Sampling, next_tokens

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    assert next_tokens(logits, Sampling()).tolist() == [1, 0]
    assert next_tokens(logits, Sampling(temperature=1.0, top_k=1), g).tolist() == [1, 0]
    assert next_tokens(logits, Sampling(temperature=1.0, top_p=1e-6), g).tolist() == [1, 0]
    drawn = torch.stack(
        [next_tokens(logits, Sampling(temperature=1.0, top_k=2), g) for _ in range(200)]
    )
    assert set(drawn[:, 0].tolist()) == {1, 3} and set(drawn[:, 1].tolist()) == {0, 3}
    for kwargs, match in (
        (dict(top_p=0.0), "top-p must be in \\(0, 1\\], got 0.0"),
        (dict(top_p=1.5), "top-p must be in \\(0, 1\\], got 1.5"),
        (dict(top_k=-1), "top-k must be >= 0 .* got -1"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    ):
        with pytest.raises(ValueError, match=match):
            Sampling(**kwargs)
