"""Build a megatron-core ``GPTModel`` from a ``ModelConfig``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from model import megatron_compat
from model.attention.context_parallel import COMM_TYPES
from model.attention.first_values import FirstLayerValues
from model.inference.context import DecodeSlot
from model.model_config import ModelConfig
from model.pipeline_stages import (
    FirstValuesTransport,
    output_seed,
    stage_layers,
    use_global_layer_names,
)
from model.spec import block_spec, layer_spec
from model.tp_layout import shard, split_of


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": _gelu_tanh, "relu": F.relu, "swiglu": F.silu}


def transformer_config(
    cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    context_mode: str = "allgather",
) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``cfg`` at the current tensor-, pipeline- and
    context-parallel sizes (``context_mode``: ``allgather`` or ``ulysses``, see
    ``model.attention.context_parallel``).

    Master weights are always initialised on the CPU from one seed, so every TP size builds
    shards of the same weights; CUDA-only fusions stay off (the kernels here are torch's).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    cfg.check_tensor_parallel(tp)
    cfg.check_pipeline_parallel(pp)
    cfg.check_context_parallel(cp, context_mode, tp)
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
        add_qkv_bias=cfg.qkv_bias,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=_ACTIVATIONS[cfg.activation],
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        cp_comm_type=COMM_TYPES[context_mode] if cp > 1 else None,
        pipeline_dtype=params_dtype,
        batch_p2p_sync=torch.cuda.is_available(),  # its only effect is a CUDA synchronize
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
    cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    context_mode: str = "allgather",
) -> GPTModel:
    """A megatron-core GPT whose attention layers follow ``cfg`` (needs ``parallel_state``).

    At pipeline size P > 1 this rank's stage only: its slice of the layers under their global
    names, the embedding on the first stage, the final norm and output layer on the last. The
    weights do not depend on the layout: each layer (and the untied output layer) is drawn from
    its own stream of the current seed, the embedding first from the seed itself.
    """
    if not megatron_compat.installed():
        raise RuntimeError(
            "build_gpt on a CPU-only torch needs megatron-core's CUDA calls pointed at the CPU: "
            "call model.megatron_compat.install() once at start-up "
            "(pretrain.parallel.distributed.init does)"
        )
    init_seed = torch.initial_seed()
    config = transformer_config(
        cfg,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        context_mode=context_mode,
    )
    layers = stage_layers(config)
    first_values = FirstLayerValues() if cfg.uses_first_values else None
    with megatron_compat.tensor_cuda_is_identity():  # the tied copy's sync at P > 1 calls .cuda()
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(cfg, first_values, init_seed, layers),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.tied_embeddings,
            position_embedding_type=cfg.position_embedding,
            rotary_base=cfg.rotary_base,
            **rope_scaling(cfg),
            parallel_output=True,
        )
    use_global_layer_names(model, layers.start)
    if model.post_process and not cfg.tied_embeddings:
        _init_output_layer(model, config, output_seed(init_seed))
    if first_values is not None:
        first_values.attach(model)
        if config.pipeline_model_parallel_size > 1:
            groups = cfg.query_groups // config.tensor_model_parallel_size
            fold = config.tensor_model_parallel_size if config.sequence_parallel else 1
            transport = FirstValuesTransport(
                first_values, cfg.hidden_size, groups, cfg.head_dim, fold
            )
            transport.attach(model)
            model.first_values_transport = transport  # its shapes go to the schedule
    DecodeSlot().attach(model)  # forward(..., inference_context=DecodeContext) decodes
    return model


def initial_layer(cfg: ModelConfig, index: int, init_seed: int) -> torch.nn.Module:
    """Layer ``index`` alone, initialised exactly as :func:`build_gpt` at pipeline size 1
    initialises it from ``init_seed`` (every layer has its own stream): where an import draws
    the parameters its source lacks (a retrofit that adds some) without building the model."""
    from megatron.core.transformer.spec_utils import build_module

    config = transformer_config(cfg)
    first_values = FirstLayerValues() if cfg.uses_first_values else None
    spec = layer_spec(cfg, cfg.variant_of_layer(index), first_values, init_seed)
    return build_module(spec, config=config, layer_number=index + 1)


def rope_scaling(cfg: ModelConfig) -> dict:
    """``GPTModel``'s RoPE scaling arguments for ``cfg.rope_scaling``: Llama 3.1's frequency
    scaling (megatron-core's fixed low/high frequency factors 1 and 4, original context 8192) or
    linear position interpolation (positions divided by the factor)."""
    if cfg.rope_scaling == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "linear":
        return {"seq_len_interpolation_factor": cfg.rope_scaling_factor}
    return {}


def _init_output_layer(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    """Draw the untied output layer's master weight from its own stream and keep this rank's
    shard (megatron drew it from the process stream, after whatever this stage built first)."""
    weight = model.output_layer.weight
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        master = torch.empty(weight.shape[0] * tp, weight.shape[1], dtype=torch.float32)
        config.init_method(master)
    with torch.no_grad():
        weight.copy_(shard(master, split_of(weight), rank, tp).to(weight.dtype))
