"""Prefill + token-by-token decoding over a megatron-core ``GPTModel`` (any TP size).

The model's own forward does the work: with a :class:`DecodeContext` passed as megatron's
``inference_context``, every attention layer reads and appends its caches (see
``model.inference.context``; twicing's O1 cache in ``model.attention.twicing``). Prompts of
different lengths are left-padded into one batch. ``use_cache=False`` is the reference path:
a plain full forward (no context, no padding: rows are grouped by length) at every step.

Why our own loop: megatron-core's model-side plumbing (``StaticInferenceContext`` through
``GPTModel.forward``) runs on the CPU and is what we use, but its generation layer is CUDA-bound:
``TextGenerationController`` samples with ``torch.Generator(device=torch.cuda.current_device())``
and exchanges tokens through ``inference.communication_utils``, which asserts ``tensor.is_cuda``
and calls ``torch.cuda.synchronize()``; the engines set CUDA devices and build CUDA graphs; the
dynamic context needs flash kernels. The loop here is the smallest one over the same
``GPTModel.forward(..., inference_context=...)`` call.

Under tensor parallelism every rank runs the loop with its own cache shard (heads stay split);
logits are gathered over TP and the chosen tokens are broadcast from TP rank 0, so all ranks
feed the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.inference.context import DecodeContext
from model.inference.sampling import Sampling, next_tokens


@dataclass
class Generation:
    """One prompt's result: the ids fed, the ids generated (without the final eod), timing."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eod" or "length"
    seconds: float

    @property
    def tokens_per_sec(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, L]`` token ids (rows right-aligned) and the per-row left padding ``[b]``."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return tokens, pad


def positions(pad: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Position ids of slots ``start..start+n-1`` per row (a row's first real token is 0).

    Learned position embeddings read them; megatron's RoPE is indexed by slot, which is
    equivalent because RoPE scores depend only on relative positions."""
    slots = torch.arange(start, start + n, dtype=torch.long)
    return (slots[None, :] - pad[:, None]).clamp(min=0)


@torch.no_grad()
def step(model, ctx: DecodeContext, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` ``[b, s]`` at the cache's offset; logits ``[b, s or 1, vocab]``."""
    logits = model(tokens, pos, None, inference_context=ctx, runtime_gather_output=True)
    ctx.advance(tokens.size(1))
    return logits


@torch.no_grad()
def prefill(
    model, ctx: DecodeContext, tokens: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Feed the (left-padded) prompts in one pass, or in chunks of ``chunk`` positions;
    returns the logits of the last chunk (``[b, 1, vocab]`` unless ``ctx`` keeps all)."""
    pad = ctx.pad if ctx.pad is not None else torch.zeros(tokens.size(0), dtype=torch.long)
    chunk = chunk or tokens.size(1)
    logits = None
    for start in range(0, tokens.size(1), chunk):
        part = tokens[:, start : start + chunk]
        logits = step(model, ctx, part, positions(pad, ctx.length, part.size(1)))
    ctx.enable_decode_mode()
    return logits


@torch.no_grad()
def full_forward_last(model, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Last-position logits ``[len(rows), vocab]`` of a plain full forward of each row (rows of
    equal length share one batch): the no-cache reference."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    for n, idx in by_length.items():
        x = torch.tensor([list(rows[i]) for i in idx], dtype=torch.long)
        pos = torch.arange(n).expand_as(x)
        logits = model(x, pos, None, runtime_gather_output=True)[:, -1]
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.stack(out)  # type: ignore[arg-type]


def _same_on_tp_ranks(tokens: torch.Tensor) -> torch.Tensor:
    """Broadcast ``tokens`` from TP rank 0 so every rank feeds identical ids."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return tokens
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tokens
    dist.broadcast(
        tokens,
        src=parallel_state.get_tensor_model_parallel_src_rank(),
        group=parallel_state.get_tensor_model_parallel_group(),
    )
    return tokens


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eod: int,
    vocab_size: int,
    context_length: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    use_cache: bool = True,
    prefill_chunk: int | None = None,
) -> list[Generation]:
    """Continue every prompt (token ids) until ``eod`` or ``max_new_tokens``, in one batch.

    ``vocab_size``: the tokenizer's (the padded embedding rows beyond it are never sampled).
    ``context_length``: positions the model may see; a row stops (``"length"``) when it fills
    them. Sampling draws ``len(prompts)`` ids per step from one generator seeded by ``seed``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limits = [min(max_new_tokens, context_length - len(p)) for p in prompts]
    if min(limits) < 1:
        raise ValueError(
            f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in the context "
            f"of {context_length} positions"
        )
    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    b, steps = len(prompts), max(limits)
    rows = [list(p) for p in prompts]
    if use_cache:
        tokens, pad = left_pad(prompts)
        ctx = DecodeContext(b, tokens.size(1) + steps, pad=pad)
        logits = prefill(model, ctx, tokens, prefill_chunk)[:, -1]
    else:
        logits = full_forward_last(model, rows)
        last = logits
    generated: list[list[int]] = [[] for _ in range(b)]
    finish = ["length"] * b
    seconds = [0.0] * b
    active = list(range(b))
    for n in range(steps):
        chosen = _same_on_tp_ranks(next_tokens(logits[:, :vocab_size], sampling, generator))
        now = time.perf_counter() - t0
        for i in list(active):
            token = int(chosen[i])
            seconds[i] = now
            if token == eod:
                finish[i] = "eod"
                active.remove(i)
                continue
            generated[i].append(token)
            rows[i].append(token)
            if len(generated[i]) == limits[i]:
                active.remove(i)
        if not active or n == steps - 1:
            break
        if use_cache:  # every row keeps decoding (fixed batch); finished rows are ignored
            pos = positions(pad, ctx.length, 1)
            logits = step(model, ctx, chosen[:, None], pos)[:, -1]
        else:  # finished rows keep their last logits: every step draws b samples either way
            last = last.clone()
            last[active] = full_forward_last(model, [rows[i] for i in active])
            logits = last
    return [Generation(list(p), generated[i], finish[i], seconds[i]) for i, p in enumerate(prompts)]
