"""A plain-PyTorch GPT (nanoGPT-style) of the same shape as a ``ModelConfig``, for comparisons.

Pre-LN blocks, learned positions, LayerNorm, GELU MLP, tied embeddings, biases, and the same
attention function as ours (``twicing_attention`` or ``attend``) on ``[batch, seq, heads, dim]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ModelConfig
from model.attention.backend import attend
from model.attention.twicing import twicing_attention


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, twice: bool):
        super().__init__()
        h, ffn = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.heads, self.twice = cfg.num_attention_heads, twice
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = twicing_attention(q, k, v) if self.twice else attend(q, k, v)
        x = x + self.proj(a.reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.position_embedding != "learned_absolute" or cfg.activation != "gelu":
            raise ValueError("PlainGPT mirrors learned positions + GELU + LayerNorm configs only")
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.blocks = nn.ModuleList(
            Block(cfg, cfg.variant_of_layer(i) == "twicing") for i in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.hidden_size)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.size(1), device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1))
