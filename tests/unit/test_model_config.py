"""Model config validation, layer selection, and which layers a built model twices."""

from __future__ import annotations

import pytest

from data_prep.base.errors import ConfigError
from data_prep.base.strict_config import from_dict
from model import ModelConfig, build_gpt
from model.attention.layer_selection import select_layers
from model.attention.softmax import SoftmaxCoreAttention
from model.attention.twicing import TwicingCoreAttention


@pytest.mark.parametrize(
    "selection,expected",
    [
        ("all", {0, 1, 2, 3, 4, 5}),
        ("none", set()),
        ("last:2", {4, 5}),
        ("first:1", {0}),
        ([0, 3], {0, 3}),
    ],
)
def test_select_layers(selection, expected):
    assert select_layers(selection, 6) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attention_layers": "last:7", "num_layers": 6}, r"last:7.*K=7.*num_layers=6"),
        ({"attention_layers": "middle"}, r"'middle'"),
        ({"attention_layers": [0, 9]}, r"index 9"),
        ({"attention": "linear"}, r"unknown attention variant 'linear'"),
        ({"attention": "twicing", "attention_dropout": 0.1}, r"attention_dropout.*0\.1"),
        ({"num_attention_heads": 5, "hidden_size": 64}, r"not divisible by 5 heads"),
        ({"num_query_groups": 3}, r"num_query_groups.*3 does not divide"),
        ({"rope_scaling_factor": 8.0}, r"rope_scaling_factor.*8.0, but model.rope_scaling is"),
        ({"rope_scaling": "linear", "rope_scaling_factor": 0.0}, r"rope_scaling_factor.*> 0"),
        (
            {
                "rope_scaling": "llama3",
                "rope_scaling_factor": 8.0,
                "position_embedding": "learned_absolute",
            },
            r"'model.rope_scaling': 'llama3' scales RoPE",
        ),  # fmt: skip
    ],
)
def test_bad_model_configs_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_softmax_with_attention_dropout_is_allowed():
    assert ModelConfig(attention="softmax", attention_dropout=0.1).attention_dropout == 0.1
    # twicing only in the last layer: dropout still refused there
    with pytest.raises(ConfigError, match="layer 1"):
        ModelConfig(attention="twicing", attention_layers="last:1", attention_dropout=0.1)


@pytest.mark.parametrize(
    "kwargs,tp,match",
    [
        (
            {"num_attention_heads": 6, "hidden_size": 96},
            4,
            r"6 heads are not divisible by tensor-parallel size 4",
        ),
        (
            {"num_attention_heads": 4, "num_query_groups": 1},
            2,
            r"1 query groups are not divisible by tensor-parallel size 2",
        ),
    ],
)
def test_tensor_parallel_divisibility(kwargs, tp, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs).check_tensor_parallel(tp)


def test_from_dict_rejects_unknown_keys_and_types():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.num_layer'"):
        from_dict(ModelConfig, {"num_layer": 2}, "model")
    with pytest.raises(ConfigError, match=r"'model.num_layers': expected int, got '2x'"):
        from_dict(ModelConfig, {"num_layers": "2x"}, "model")
    with pytest.raises(ConfigError, match=r"'model.position_embedding': 'alibi' is not one of"):
        from_dict(ModelConfig, {"position_embedding": "alibi"}, "model")
    cfg = from_dict(ModelConfig, {"attention_layers": [1], "num_layers": 3}, "model")
    assert cfg.attention_layers == [1]


@pytest.mark.parametrize(
    "layers,twiced", [("all", {0, 1, 2, 3}), ("last:2", {2, 3}), ([0, 2], {0, 2}), ("none", set())]
)
def test_built_model_twices_exactly_the_configured_layers(one_rank, layers, twiced):
    model = build_gpt(ModelConfig(num_layers=4, attention="twicing", attention_layers=layers))
    kinds = [type(layer.self_attention.core_attention) for layer in model.decoder.layers]
    assert {i for i, k in enumerate(kinds) if k is TwicingCoreAttention} == twiced
    assert all(k is SoftmaxCoreAttention for i, k in enumerate(kinds) if i not in twiced)


def test_rope_scaling_and_qkv_bias_reach_megatron(one_rank):
    """``rope_scaling`` sets megatron-core's RoPE (llama3: scaled frequencies; linear: position
    interpolation), ``qkv_bias`` a bias on the QKV projection only, ``gelu_tanh`` the tanh GELU."""
    import torch

    base = dict(num_layers=1, attention="softmax", add_bias_linear=False)
    plain = build_gpt(ModelConfig(**base)).rotary_pos_emb
    llama3 = build_gpt(
        ModelConfig(**base, rotary_base=500000, rope_scaling="llama3", rope_scaling_factor=8.0)
    ).rotary_pos_emb
    linear = build_gpt(ModelConfig(**base, rope_scaling="linear", rope_scaling_factor=4.0))
    assert plain.seq_len_interpolation_factor is None
    assert linear.rotary_pos_emb.seq_len_interpolation_factor == 4.0
    assert not torch.equal(llama3.inv_freq, 1.0 / (500000 ** (torch.arange(0, 16, 2) / 16)))
    model = build_gpt(ModelConfig(**base, qkv_bias=True, activation="gelu_tanh"))
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names
    assert not any(n.endswith("linear_proj.bias") or n.endswith("fc1.bias") for n in names)
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(
        model.config.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh")
    )
