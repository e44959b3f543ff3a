"""Weight adapter: our megatron-core GPT (RoPE + RMSNorm + SwiGLU) as ``LlamaForCausalLM``.

RoPE is non-interleaved (rotate-half) in both; GQA maps to ``num_key_value_heads``; linear biases
map to ``attention_bias`` / ``mlp_bias``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model import ModelConfig
from pretrain.export.fused_qkv import split_qkv

Take = Callable[[str], torch.Tensor]


def hf_config(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``LlamaConfig`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    import transformers

    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=cfg.tied_embeddings,
        attention_bias=cfg.add_bias_linear,
        mlp_bias=cfg.add_bias_linear,
        attention_dropout=0.0,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        **special,
    )


def model_class():
    import transformers

    return transformers.LlamaForCausalLM


def convert(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """HF Llama parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    out: dict[str, torch.Tensor] = {}
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    bias = cfg.add_bias_linear
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
        q, k, v = split_qkv(take(src + "self_attention.linear_qkv.weight"), cfg)
        out |= {
            dst + f"self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v), strict=True)
        }
        out[dst + "self_attn.o_proj.weight"] = take(src + "self_attention.linear_proj.weight")
        gate, up = take(src + "mlp.linear_fc1.weight").split([ffn, ffn], dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.linear_fc2.weight")
        if bias:
            q, k, v = split_qkv(take(src + "self_attention.linear_qkv.bias"), cfg)
            out |= {
                dst + f"self_attn.{n}_proj.bias": t for n, t in zip("qkv", (q, k, v), strict=True)
            }
            out[dst + "self_attn.o_proj.bias"] = take(src + "self_attention.linear_proj.bias")
            gate, up = take(src + "mlp.linear_fc1.bias").split([ffn, ffn], dim=0)
            out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = gate, up
            out[dst + "mlp.down_proj.bias"] = take(src + "mlp.linear_fc2.bias")
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    return out
