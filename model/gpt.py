"""Build a megatron-core ``GPTModel`` from a ``ModelConfig``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from model import cpu_compat
from model.attention.first_values import FirstLayerValues
from model.config import ModelConfig
from model.inference.context import DecodeSlot
from model.spec import block_spec

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu}


def transformer_config(
    cfg: ModelConfig, *, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``cfg`` at the current tensor-parallel size.

    Master weights are always initialised on the CPU from one seed, so every TP size builds
    shards of the same weights; CUDA-only fusions stay off (the kernels here are torch's).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg.check_tensor_parallel(tp)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layernorm_epsilon,
        normalization=cfg.normalization,
        add_bias_linear=cfg.add_bias_linear,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=_ACTIVATIONS[cfg.activation],
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt(
    cfg: ModelConfig, *, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32
) -> GPTModel:
    """A megatron-core GPT whose attention layers follow ``cfg`` (needs ``parallel_state``)."""
    cpu_compat.install()
    config = transformer_config(cfg, sequence_parallel=sequence_parallel, params_dtype=params_dtype)
    first_values = FirstLayerValues() if cfg.uses_first_values else None
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(cfg, first_values),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        share_embeddings_and_output_weights=cfg.tied_embeddings,
        position_embedding_type=cfg.position_embedding,
        rotary_base=cfg.rotary_base,
        parallel_output=True,
    )
    if first_values is not None:
        first_values.attach(model)
    DecodeSlot().attach(model)  # forward(..., inference_context=DecodeContext) decodes
    return model
