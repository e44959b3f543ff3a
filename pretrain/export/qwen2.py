"""Adapter, both directions: our megatron-core GPT with a bias on Q, K, V only (``qkv_bias``)
and ``Qwen2ForCausalLM``: Llama's layout (the same name mapping, ``llama.pairs``) with QKV biases
always on and none elsewhere. A sliding window (``use_sliding_window`` or ``sliding_attention``
layers) is refused where it is shorter than ``seq_length``.
"""

from __future__ import annotations

import torch

from model import ModelConfig
from pretrain.export import llama
from pretrain.export.config_json import ConfigJson
from pretrain.export.mapping import Recipes, Take, from_hf, to_hf

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPES = ("qwen2",)
pairs = llama.pairs  #: the one name mapping, Llama's (with ``qkv_bias``)


def to_hf_weights(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """HF Qwen2 parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    return to_hf(pairs(cfg), take)


def from_hf_weights(cfg: ModelConfig, take: Take) -> Recipes:
    """Our TP=1 weights from HF Qwen2 tensors, as recipes (see ``mapping.from_hf``)."""
    return from_hf(pairs(cfg), take)


def config_to_hf(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``Qwen2Config`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    import transformers

    return transformers.Qwen2Config(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        tie_word_embeddings=cfg.tied_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
        architectures=[ARCHITECTURE],
        dtype=dtype,
        rope_parameters=llama.rope_parameters(cfg),
        **special,
    )


def config_from_hf(cj: ConfigJson) -> dict:
    """``ModelConfig`` fields of a Qwen2 ``config.json``."""
    fields = llama.decoder_fields(cj, tied_default=False)
    return fields | {"add_bias_linear": False, "qkv_bias": True}


def check_import(cj: ConfigJson, cfg: ModelConfig) -> None:
    """Refusals that depend on the final (overridden) config: a sliding window in use."""
    sliding = cj.flag("use_sliding_window", False) or "sliding_attention" in (
        cj.get("layer_types") or []
    )
    if sliding:
        llama.check_sliding_window(cj, cfg, cj.get("sliding_window"))


def model_class():
    import transformers

    return transformers.Qwen2ForCausalLM
