"""The decoding cache: megatron-core's static inference context, plus what our variants add.

megatron-core's ``StaticInferenceContext`` runs on the CPU (its buffers are allocated on
``torch.cuda.current_device()``, which ``model.megatron_compat`` points at the CPU): passed as
``GPTModel.forward(..., inference_context=ctx)`` every ``SelfAttention`` appends the new keys and
values (pre-RoPE, this rank's query groups, ``[max_seq, max_batch, groups, head_dim]``) at
``ctx.sequence_len_offset`` and hands our core attention the whole cache ``[:offset + s_new]``.
Its dynamic context (paged KV, ``flash_decode_and_prefill``) is CUDA/flash-only, so we use the
static one. Two things megatron does not provide:

- **extra per-layer caches** (:meth:`DecodeContext.append`): twicing's first-pass output O1,
  ``[max_batch, max_seq, heads, head_dim]`` at this rank's query-head width;
- **left padding** of batched prompts of different lengths (:attr:`DecodeContext.pad`): row ``b``'s
  first ``pad[b]`` slots are padding; :meth:`DecodeContext.key_mask` hides them from every query
  (a padding query sees only itself, so no row is empty). megatron's RoPE is indexed by slot, and
  RoPE scores depend only on ``i − j``, so a left-padded row computes what it would alone.

Core attention modules find the context through a :class:`DecodeSlot` shared by the model's
modules; a forward pre-hook on the ``GPTModel`` fills it from the ``inference_context`` keyword
of every call (``None`` for a plain forward), so nothing else has to thread it through.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.inference.contexts import StaticInferenceContext


class DecodeContext(StaticInferenceContext):
    """megatron's static KV cache for ``max_batch`` rows of up to ``max_seq`` positions.

    ``pad``: per-row left padding (``[max_batch]`` ints) or ``None``. ``all_logits``: return the
    logits of every new position (default: only the last one, as megatron does).
    """

    def __init__(
        self,
        max_batch: int,
        max_seq: int,
        *,
        pad: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> None:
        super().__init__(max_batch, max_seq)
        self.materialize_only_last_token_logits = not all_logits
        if pad is not None and (pad.shape != (max_batch,) or int(pad.max()) >= max_seq):
            raise ValueError(f"pad must be [{max_batch}] ints below {max_seq}, got {pad}")
        self.pad = pad if pad is not None and bool(pad.any()) else None
        self.extra: dict[tuple[int, str], torch.Tensor] = {}
        self._mask: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """Positions already in the cache (the next token's slot)."""
        return self.sequence_len_offset

    def advance(self, n: int) -> None:
        """Mark ``n`` new positions as cached (call after each forward)."""
        self.sequence_len_offset += n

    def append(self, layer: int, name: str, new: torch.Tensor) -> torch.Tensor:
        """Write ``new`` (``[b, s_new, ...]``) at the current offset of cache ``(layer, name)``;
        return the cache up to and including it, ``[b, offset + s_new, ...]``."""
        key = (layer, name)
        buf = self.extra.get(key)
        if buf is None:
            buf = new.new_empty(self.max_batch_size, self.max_sequence_length, *new.shape[2:])
            self.extra[key] = buf
        b0, b1 = self.batch_size_offset, self.batch_size_offset + new.size(0)
        end = self.sequence_len_offset + new.size(1)
        if end > self.max_sequence_length:
            raise ValueError(f"cache of {self.max_sequence_length} positions is full ({end})")
        buf[b0:b1, self.sequence_len_offset : end] = new
        return buf[b0:b1, :end]

    def key_mask(self, batch: int, s_q: int, s_k: int, device: torch.device) -> torch.Tensor | None:
        """Bool ``[batch, 1, s_q, s_k]`` (True = may attend) hiding left padding, or ``None``.

        Causality is not in it (``attend`` adds it); a padding query keeps its own key."""
        if self.pad is None:
            return None
        key = (self.sequence_len_offset, batch, s_q, s_k)
        if self._mask is not None and self._mask[0] == key:
            return self._mask[1]
        b0 = self.batch_size_offset
        pad = self.pad[b0 : b0 + batch].to(device)
        j = torch.arange(s_k, device=device)
        own = (s_k - s_q + torch.arange(s_q, device=device))[:, None] == j  # [s_q, s_k]
        mask = ((j >= pad[:, None, None]) | own)[:, None]  # [batch, 1, s_q, s_k]
        self._mask = (key, mask)
        return mask


class DecodeSlot:
    """The inference context of the model's current forward, shared by its attention modules."""

    def __init__(self) -> None:
        self.context: DecodeContext | None = None

    def attach(self, model: torch.nn.Module) -> None:
        """Give every core-attention module of ``model`` (those with a ``decode_slot``
        attribute: ``model.attention.base.CoreAttention``) this slot; fill it at each forward."""
        for module in model.modules():
            if hasattr(module, "decode_slot"):
                module.decode_slot = self
        model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ctx = kwargs.get("inference_context") or kwargs.get("inference_params")
        if ctx is not None and not isinstance(ctx, DecodeContext):
            raise TypeError(
                f"twicing-lm attention decodes with model.inference.context.DecodeContext, got "
                f"{type(ctx).__name__}"
            )
        self.context = ctx
