"""The megatron-core core-attention contract, shared by every variant's module.

megatron-core's ``SelfAttention`` builds ``core_attention`` from a ``ModuleSpec`` and calls it with
this rank's heads as ``[seq, batch, heads_per_partition, head_dim]``. Heads are already split
across tensor-parallel ranks, so nothing here communicates. Subclasses supply ``attention`` on
``[batch, seq, heads, head_dim]`` tensors (plus any extra inputs from ``extra_inputs``); masks,
layout, selective recompute and the first layer's values live here.

Incremental decoding (``model.inference``): when the model's forward got an
``inference_context``, megatron hands us the new queries and the whole K/V cache
(``seq_q <= seq_k``); ``decode`` then runs with bottom-right causal masking plus the context's
left-padding mask. Variants whose output is a function of (new q, cached K, cached V) need
nothing more; twicing overrides ``decode`` to keep its O1 cache.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention import context_parallel as cp
from model.attention.backend import Backend, ResolvedBackend, repeat_kv, resolve_backend
from model.attention.first_values import FirstLayerValues
from model.attention.registry import AttentionVariant, variant
from model.inference.context import DecodeContext, DecodeSlot

_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.no_mask: False}


class CoreAttention(MegatronModule):
    """Base class implementing megatron-core's core-attention call contract.

    Args (beyond megatron's): ``backend`` picks the kernel (``auto``/``flash``/``sdpa``);
    ``recompute`` re-runs this module in backward instead of storing its activations;
    ``first_values`` is the model's shared holder of layer 0's values (layer 0 fills it);
    ``options`` are the variant's numeric knobs (see the registry's ``options``).
    """

    #: the registry entry of this variant (capabilities, options, attention passes)
    VARIANT: ClassVar[AttentionVariant]

    def __init_subclass__(cls, name: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.VARIANT = variant(name)

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        backend: Backend = "auto",
        recompute: bool = False,
        first_values: FirstLayerValues | None = None,
        options: dict[str, float] | None = None,
    ) -> None:
        super().__init__(config=config)
        #: context parallelism (``model.attention.context_parallel``): the group and the mode
        self.cp_group = None
        self.cp_mode: str | None = None
        if config.context_parallel_size > 1:
            modes = {v: k for k, v in cp.COMM_TYPES.items()}
            if cp_comm_type not in modes:
                raise ValueError(
                    f"context parallelism needs cp_comm_type {sorted(modes)}, got {cp_comm_type!r}"
                )
            self.cp_mode = modes[cp_comm_type]
            self.cp_group = parallel_state.get_context_parallel_group()
        #: Ulysses: which of this rank's heads the current forward runs (None: all)
        self.heads: slice | None = None
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.backend: Backend = backend
        self.recompute = recompute
        self.first_values = first_values
        self.options = self.VARIANT.check_options(options or {})
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if self.dropout and not self.VARIANT.supports_dropout:
            raise ValueError(
                f"{type(self).__name__} (layer {layer_number}) needs attention_dropout == 0, got "
                f"{self.dropout}: its attention passes would draw different dropout masks"
            )
        if self.VARIANT.uses_first_values and first_values is None:
            raise ValueError(f"{type(self).__name__} needs the model's FirstLayerValues holder")
        #: set by ``DecodeSlot.attach`` (``build_gpt``): the current forward's inference context
        self.decode_slot: DecodeSlot | None = None
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        #: the concrete kernel of the current forward (``self.backend`` resolved for its inputs)
        self.kernel: ResolvedBackend = ResolvedBackend("sdpa")
        self._kernels: dict[tuple, ResolvedBackend] = {}

    def resolve_kernel(self, q: torch.Tensor) -> ResolvedBackend:
        """``self.backend`` resolved for inputs like ``q`` (device, dtype, head dim) and this
        mode's dropout: once per module and kind of input, not on every call of a pass."""
        dropout = self.dropout if self.training else 0.0
        key = (q.device, q.dtype, q.size(-1), dropout)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = ResolvedBackend(resolve_backend(self.backend, q, dropout))
            self._kernels[key] = kernel
        return kernel

    @property
    def is_first_layer(self) -> bool:
        return self.layer_number == 1

    def extra_inputs(self, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors this variant needs beyond q, k, v (``[b, s, ...]`` layout)."""
        return ()

    def attention(
        self, q, k, v, causal: bool, *extra: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The variant's math on ``[batch, seq, heads, head_dim]``; returns ``q``'s shape.

        ``seq_q <= seq_k``: the queries are the last positions (bottom-right causal); ``mask``
        (bool ``[b, 1, s_q, s_k]``, True = may attend) hides padding keys."""
        raise NotImplementedError

    def context_parallel(self, q, k, v, causal: bool, *extra: torch.Tensor) -> torch.Tensor:
        """This rank's share of the attention of a sequence split over the context-parallel
        group (``q``/``k``/``v``/``extra``: this rank's two chunks, ``[b, s/C, …]``)."""
        if not causal:
            raise ValueError("context parallelism needs causal attention")
        layout = cp.layout_for(self.cp_group, q.size(1))
        if self.cp_mode == "ulysses":
            q, k, v, *extra = (cp.seq_to_heads(t, self.cp_group, layout) for t in (q, k, v, *extra))
            self.heads = cp.head_slice(layout, q.size(2) * layout.size)
            try:
                out = self.attention(q, k, v, True, *extra)
            finally:
                self.heads = None
            return cp.heads_to_seq(out, self.cp_group, layout)
        k, v, *extra = (cp.gather_sequence(t, self.cp_group, layout) for t in (k, v, *extra))
        return self.chunked_attention(layout, q, k, v, *extra)

    def chunked_attention(self, layout: cp.ChunkLayout, q, k, v, *extra) -> torch.Tensor:
        """All-gather mode: each local query chunk against the gathered keys up to its end (the
        queries are the last positions: bottom-right causal, as in decoding)."""

        def chunk(q_chunk, end):
            return self.attention(
                q_chunk, k[:, :end], v[:, :end], True, *(e[:, :end] for e in extra)
            )

        return cp.per_chunk(layout, q, chunk)

    def decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: DecodeContext,
        mask: torch.Tensor | None,
        *extra: torch.Tensor,
    ) -> torch.Tensor:
        """One incremental step: ``q`` holds the new positions, ``k``/``v`` (and ``extra``) the
        whole cache including them. Default: the variant's math over the cache."""
        return self.attention(q, k, v, True, *extra, mask=mask)

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Unmasked logits ``[b, h, s_q, s_k]`` of the softmax map ``A`` this variant uses
        (diagnostics only; the forward pass never materialises them). Twicing's effective
        weights ``2A − A²`` are built from this same ``A``."""
        k = repeat_kv(k, q.size(2))
        return torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * self.softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in _CAUSAL:
            raise ValueError(f"attention mask type {mask_type.name} is not supported (causal only)")
        if (
            attention_mask is not None
            or attention_bias is not None
            or packed_seq_params is not None
        ):
            raise ValueError(
                "explicit attention masks, biases and packed sequences are not supported: causal "
                "masking is built into the kernel (build data with create_attention_mask=False)"
            )
        # [s, b, h, d] -> [b, s, h, d] (views; the kernel picks its own layout)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        self.kernel = self.resolve_kernel(q)
        if self.first_values is not None and self.is_first_layer:
            self.first_values.put(v)
        extra = self.extra_inputs(v)
        causal = _CAUSAL[mask_type]
        ctx = self.decode_slot.context if self.decode_slot is not None else None
        if ctx is not None:
            # megatron passes no_mask once the cache is non-empty; our layers stay causal
            if not _CAUSAL[self.attn_mask_type]:
                raise ValueError("incremental decoding needs causal attention layers")
            mask = ctx.key_mask(q.size(0), q.size(1), k.size(1), q.device)
            out = self.decode(q, k, v, ctx, mask, *extra)
        else:
            run = self.context_parallel if self.cp_group is not None else self.attention
            if self.recompute and self.training and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(
                    run, q, k, v, causal, *extra, use_reentrant=False
                )
            else:
                out = run(q, k, v, causal, *extra)
        s, b = query.size(0), query.size(1)
        return out.transpose(0, 1).reshape(s, b, -1)
