"""Weight adapter: any twicing-lm GPT (every attention variant, per layer) as custom
``transformers`` code (``remote_code/``), loaded with ``trust_remote_code=True``.

The modeling files are copied into the export and named by ``config.json``'s ``auto_map``; they
import neither twicing-lm nor megatron. Parameter names mirror megatron-core's (fused QKV kept in
its per-group layout), so the conversion is a rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from data_prep.base.errors import ConfigError
from model import ModelConfig
from pretrain.export.config_json import ConfigJson
from pretrain.export.mapping import Pair, Recipes, Take, from_hf, rename, to_hf

ARCHITECTURE = "TwicingForCausalLM"
MODEL_TYPES = ("twicing_lm",)

CODE_DIR = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_twicing.py", "modeling_twicing.py")
AUTO_MAP = {
    "AutoConfig": "configuration_twicing.TwicingLMConfig",
    "AutoModelForCausalLM": "modeling_twicing.TwicingForCausalLM",
}
#: the variants the custom code computes (a new registry variant must be added there first)
SUPPORTED = ("softmax", "twicing", "neutreno", "resformer", "svformer", "neural")


def unsupported(cfg: ModelConfig) -> str | None:
    """Why the custom code cannot export ``cfg``, or None."""
    for i in range(cfg.num_layers):
        variant = cfg.variant_of_layer(i)
        if variant not in SUPPORTED:
            return (
                f"layer {i} uses {variant!r} attention, which the exported modeling code does "
                f"not implement (it computes {', '.join(SUPPORTED)})"
            )
    return None


def config_to_hf(cfg: ModelConfig, special: dict, dtype: torch.dtype):
    """The ``TwicingLMConfig`` of ``cfg`` (``special``: bos/eos/pad token ids)."""
    from pretrain.export.remote_code.configuration_twicing import TwicingLMConfig

    options = dict(cfg.attention_options)
    if cfg.attention == "neural":
        options["dim"] = float(int(options.get("dim", 0)) or max(2, cfg.head_dim // 32))
    return TwicingLMConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        max_position_embeddings=cfg.seq_length,
        position_embedding=cfg.position_embedding,
        rope_theta=float(cfg.rotary_base),
        rope_scaling_type=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
        normalization=cfg.normalization,
        layer_norm_eps=cfg.layernorm_epsilon,
        activation=cfg.activation,
        linear_bias=cfg.add_bias_linear,
        qkv_bias=cfg.qkv_bias,
        layer_variants=[cfg.variant_of_layer(i) for i in range(cfg.num_layers)],
        attention_options=options,
        attention=cfg.attention,
        attention_layers=cfg.attention_layers,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        dtype=dtype,
        **special,
    )


def model_class():
    from pretrain.export.remote_code.modeling_twicing import TwicingForCausalLM

    return TwicingForCausalLM


def pairs(cfg: ModelConfig) -> list[Pair]:
    """Every tensor of the custom model, ours ↔ theirs: renames (its names mirror ours)."""
    from pretrain.export.remote_code.modeling_twicing import NEURAL_SHAPES

    out = [rename("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if cfg.position_embedding == "learned_absolute":
        out.append(
            rename("embedding.position_embeddings.weight", "model.position_embeddings.weight")
        )
    norm = ("weight",) if cfg.normalization == "RMSNorm" else ("weight", "bias")
    linear = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    qkv = ("weight", "bias") if cfg.add_bias_linear or cfg.qkv_bias else ("weight",)
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        names = [(f"input_layernorm.{p}", f"input_layernorm.{p}") for p in norm]
        names += [(f"pre_mlp_layernorm.{p}", f"post_attention_layernorm.{p}") for p in norm]
        names += [(f"self_attention.linear_qkv.{p}", f"self_attn.linear_qkv.{p}") for p in qkv]
        for ours, theirs in (
            ("self_attention.linear_proj", "self_attn.linear_proj"),
            ("mlp.linear_fc1", "mlp.linear_fc1"),
            ("mlp.linear_fc2", "mlp.linear_fc2"),
        ):
            names += [(f"{ours}.{p}", f"{theirs}.{p}") for p in linear]
        if cfg.variant_of_layer(i) == "neural":
            core = "self_attention.core_attention"
            names += [(f"{core}.{n}", f"self_attn.{n}") for n in NEURAL_SHAPES]
        out += [rename(src + ours, dst + theirs) for ours, theirs in names]
    out += [rename(f"decoder.final_layernorm.{p}", f"model.norm.{p}") for p in norm]
    if not cfg.tied_embeddings:
        out.append(rename("output_layer.weight", "lm_head.weight"))
    return out


def to_hf_weights(cfg: ModelConfig, take: Take) -> dict[str, torch.Tensor]:
    """The custom model's parameters from our TP=1 weights (``take(name)`` pops one of ours)."""
    return to_hf(pairs(cfg), take)


def from_hf_weights(cfg: ModelConfig, take: Take) -> Recipes:
    """Our TP=1 weights from an export's tensors, as recipes (see ``mapping.from_hf``)."""
    return from_hf(pairs(cfg), take)


#: the config keys ``config_to_hf`` writes that are ``ModelConfig`` fields under another name
_RENAMED = {
    "num_layers": "num_hidden_layers",
    "ffn_hidden_size": "intermediate_size",
    "num_query_groups": "num_key_value_heads",
    "seq_length": "max_position_embeddings",
    "rope_scaling": "rope_scaling_type",
    "layernorm_epsilon": "layer_norm_eps",
    "add_bias_linear": "linear_bias",
    "tied_embeddings": "tie_word_embeddings",
}
_SAME = ("hidden_size", "num_attention_heads", "vocab_size", "position_embedding",
         "rope_scaling_factor", "normalization", "activation", "qkv_bias", "attention",
         "attention_layers", "attention_options")  # fmt: skip


def config_from_hf(cj: ConfigJson) -> dict:
    """``ModelConfig`` fields of a ``twicing_lm`` export's ``config.json`` (what
    :func:`config_to_hf` wrote; its ``layer_variants`` must be what ``attention`` and
    ``attention_layers`` select)."""
    import math

    fields = {ours: cj.get(theirs) for ours, theirs in _RENAMED.items()}
    fields |= {key: cj.get(key) for key in _SAME}
    fields = {k: v for k, v in fields.items() if v is not None}
    theta = cj.number("rope_theta", 10000.0)
    if theta != int(theta):
        cj.refuse("rope_theta", "twicing-lm's rotary_base is an integer")
    fields |= {
        "rotary_base": int(theta),
        "vocab_pad_multiple": math.gcd(cj.integer("vocab_size"), 128),
        "init_std": cj.number("initializer_range", 0.02),
    }
    try:
        cfg = ModelConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cj.path}: not a twicing-lm export's config: {e}") from None
    if cj.get("layer_variants") != [cfg.variant_of_layer(i) for i in range(cfg.num_layers)]:
        cj.refuse("layer_variants", "does not match attention and attention_layers")
    return fields


def check_import(cj: ConfigJson, cfg: ModelConfig) -> None:
    """Nothing depends on the final config."""


def write_code(out: Path) -> None:
    """Copy the modeling code beside ``config.json`` (what ``auto_map`` names)."""
    for name in CODE_FILES:
        shutil.copy2(CODE_DIR / name, out / name)
