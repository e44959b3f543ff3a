"""What the evaluation driver scores text with: a twicing-lm checkpoint, or (``hf.py``) a Hugging
Face export. Both give the driver the same things: a tokenizer, the context limits, a per-token
NLL function, optional probes, and the report's description of the source."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol

import torch

#: ``(tokens, positions, labels) -> per-token NLL [b, s]``
TokenNLL = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Scorer(Protocol):
    tokenizer: Any
    rank: int
    #: default window length (the training sequence length), None if unknown
    seq_length: int | None
    #: hard limit of the positions (learned absolute embeddings), None if none
    max_positions: int | None

    def load(self) -> None:
        """Build the model (after the cheap checks passed)."""

    def token_nll(self) -> TokenNLL: ...

    def probes(self, args: argparse.Namespace) -> tuple[Any, Any]:
        """(over-smoothing probe, attention-entropy probe), each None when not asked/possible."""

    def describe(self) -> dict[str, Any]:
        """The report's source fields (checkpoint, step, model, tokenizer, tensor_parallel)."""


def token_nll(model) -> TokenNLL:
    """Per-token NLL of a megatron-core GPT (its forward with ``labels``)."""

    def fn(tokens, positions, labels):
        return model(tokens, positions, None, labels=labels)

    return fn


class CheckpointScorer:
    """A twicing-lm checkpoint (sharded at any TP, or consolidated) at TP = the world size."""

    def __init__(self, args: argparse.Namespace):
        from pretrain.checkpoint.reader import open_checkpoint

        self.ck = open_checkpoint(args.checkpoint, args.tag, args.tokenizer)
        self.tokenizer = self.ck.tokenizer
        self.seq_length = self.ck.model.seq_length
        learned = self.ck.model.position_embedding == "learned_absolute"
        self.max_positions = self.seq_length if learned else None
        self.rank, self.tp = 0, 1

    def load(self) -> None:
        from pretrain.checkpoint.load_model import load_model
        from pretrain.parallel.distributed import init_for_inference

        self.rank, self.tp = init_for_inference()
        self.model = load_model(self.ck, self.rank, self.tp)

    def token_nll(self) -> TokenNLL:
        return token_nll(self.model)

    def probes(self, args: argparse.Namespace) -> tuple[Any, Any]:
        from pretrain.evaluation.attention_entropy import AttentionEntropyProbe
        from pretrain.evaluation.oversmoothing import HiddenStateProbe

        skip = args.skip_positions
        return (
            HiddenStateProbe(self.model, skip) if args.oversmoothing else None,
            AttentionEntropyProbe(self.model, skip) if args.attention_entropy else None,
        )

    def describe(self) -> dict[str, Any]:
        m = self.ck.model
        return {
            "checkpoint": str(self.ck.tag_dir),
            "step": self.ck.step,
            "model": {
                "attention": m.attention,
                "attention_layers": m.attention_layers,
                "num_layers": m.num_layers,
                "hidden_size": m.hidden_size,
            },
            "tokenizer_sha256": self.tokenizer.sha256,
            "tensor_parallel": self.tp,
        }
