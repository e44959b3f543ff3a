"""Shared by the decoding tests (in-process TP=1 and the TP=2 worker): tiny configs of every
variant and the checks that cached decoding reproduces the full forward."""

from __future__ import annotations

import torch

from model import ModelConfig

_BASE = dict(
    num_layers=3,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    vocab_size=96,
    vocab_pad_multiple=32,
    seq_length=32,
)

#: name -> ModelConfig kwargs: every variant, GQA in most, learned positions in one
CASES: dict[str, dict] = {
    "softmax-gqa": dict(attention="softmax", num_query_groups=2),
    "twicing-all-gqa": dict(attention="twicing", num_query_groups=2),
    "twicing-last1": dict(attention="twicing", attention_layers="last:1"),
    "twicing-learned-pos": dict(attention="twicing", position_embedding="learned_absolute"),
    "neutreno-gqa": dict(attention="neutreno", num_query_groups=2),
    "resformer": dict(attention="resformer"),
    "svformer-gqa": dict(attention="svformer", num_query_groups=2),
    "neural-gqa": dict(attention="neural", num_query_groups=2, attention_options={"dim": 4}),
}


def config(name: str) -> ModelConfig:
    return ModelConfig(**{**_BASE, **CASES[name]})


def build(name: str):
    from model import build_gpt

    torch.manual_seed(1234)
    return build_gpt(config(name)).eval()


def tokens(b: int, n: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(
        0, _BASE["vocab_size"], (b, n), generator=torch.Generator().manual_seed(seed)
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def full_logits(model, x: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(x.size(1)).expand_as(x)
    return model(x, pos, None, runtime_gather_output=True)


@torch.no_grad()
def cached_logits(model, x: torch.Tensor, prompt: int, chunk: int | None = None) -> torch.Tensor:
    """Logits at every position: prefill ``x[:, :prompt]`` (in chunks), then one step per token."""
    from model.inference.context import DecodeContext
    from model.inference.generation import prefill, step

    ctx = DecodeContext(x.size(0), x.size(1), all_logits=True)
    parts = [prefill(model, ctx, x[:, :prompt], chunk)] if chunk is None else []
    if chunk is not None:  # keep every chunk's logits
        for start in range(0, prompt, chunk):
            end = min(start + chunk, prompt)
            pos = torch.arange(start, end).expand(x.size(0), -1)
            parts.append(step(model, ctx, x[:, start:end], pos))
    for t in range(prompt, x.size(1)):
        parts.append(step(model, ctx, x[:, t : t + 1], torch.full((x.size(0), 1), t)))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def padded_logits(model, rows: list[torch.Tensor], new: int) -> list[torch.Tensor]:
    """Each row's logits at its real positions, decoded as one left-padded batch: prefill the
    first ``len - new`` tokens of every row, then feed the last ``new`` one step at a time."""
    from model.inference.context import DecodeContext
    from model.inference.generation import left_pad, positions, prefill, step

    prompts = [r[:-new].tolist() for r in rows]
    x, pad = left_pad(prompts)
    ctx = DecodeContext(len(rows), x.size(1) + new, pad=pad, all_logits=True)
    parts = [prefill(model, ctx, x)]
    for t in range(new):
        nxt = torch.stack([r[len(r) - new + t] for r in rows])[:, None]
        parts.append(step(model, ctx, nxt, positions(pad, ctx.length, 1)))
    logits = torch.cat(parts, dim=1)
    return [logits[i, int(pad[i]) :] for i in range(len(rows))]


def check_case(name: str) -> dict[str, float]:
    """Relative errors of every decoding path against the full forward, for case ``name``."""
    model = build(name)
    x = tokens(2, 16)
    full = full_logits(model, x)
    rows = [tokens(1, n, seed=n)[0] for n in (6, 11, 16)]
    padded = padded_logits(model, rows, new=4)
    alone = [full_logits(model, r[None])[0] for r in rows]
    return {
        "prefill_decode": rel(cached_logits(model, x, prompt=10), full),
        "chunked": rel(cached_logits(model, x, prompt=10, chunk=3), cached_logits(model, x, 10)),
        "left_padded": max(rel(p, a) for p, a in zip(padded, alone, strict=True)),
    }
