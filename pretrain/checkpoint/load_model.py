"""A checkpoint's GPT with this rank's weights: what evaluation, generation and lm-eval run."""

from __future__ import annotations

import torch

from data_prep.base.errors import CheckpointError
from pretrain.checkpoint.reader import Checkpoint, state_dict_for_rank


def load_model(ck: Checkpoint, rank: int, tp: int) -> torch.nn.Module:
    """The checkpoint's GPT at TP=``tp`` with rank ``rank``'s weights, in eval mode (needs
    megatron's ``parallel_state`` at that TP size)."""
    from model import build_gpt

    torch.manual_seed(0)
    model = build_gpt(ck.model)
    missing, unexpected = model.load_state_dict(state_dict_for_rank(ck, rank, tp), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{ck.tag_dir}: weights do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.eval()
