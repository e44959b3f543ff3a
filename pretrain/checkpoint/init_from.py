"""Start a new run from another checkpoint's weights (``checkpoint.init_from``).

The source is any complete twicing-lm checkpoint that ``open_checkpoint`` opens: an import
(``pretrain.import_hf``), a trained run at any TP × PP × ZeRO, a step directory or a
consolidated file. Only weights come along: the new run has its own optimizer, LR schedule, data
order and step 0. :func:`weights_loader` checks the source up front (the same parameter shapes;
the same tokenizer; attention variants may differ) and returns the function ``build_engine``
calls on the freshly built model, before DeepSpeed copies the weights into its optimizer: it
loads this rank's part (its pipeline stage's global names, its TP shard; the source's shard file
directly when the layouts agree, else cut from the TP=1 merge). Parameters only one side has are
an attention variant's own (Neural Attention's scorers): new ones keep their initialisation from
the run seed, dropped ones are named; anything else that does not fit is a ``CheckpointError``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from data_prep.base.errors import CheckpointError
from data_prep.base.strict_config import to_dict
from model import ModelConfig
from model.tp_layout import shard, split_of
from pretrain.checkpoint.reader import (
    TIED_COPY,
    Checkpoint,
    full_state_dict,
    open_checkpoint,
    saved_shard,
)
from pretrain.checkpoint.state import TokenizerInfo

Say = Callable[[str], None]
#: parts of a variant's own parameters (they may appear or disappear with the variant)
VARIANT_PARAMETERS = ".core_attention."


def shape_signature(cfg: ModelConfig) -> dict[str, object]:
    """What fixes the parameter shapes of ``cfg`` (everything else may change in a new run)."""
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.query_groups,
        "ffn_hidden_size": cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "position_embedding": cfg.position_embedding,
        "normalization": cfg.normalization,
        "gated_mlp": cfg.activation == "swiglu",
        "add_bias_linear": cfg.add_bias_linear,
        "qkv_bias": cfg.qkv_bias or cfg.add_bias_linear,
        "tied_embeddings": cfg.tied_embeddings,
        "learned_positions": cfg.seq_length if cfg.position_embedding != "rope" else None,
    }


def weights_loader(
    source: str | Path, model: ModelConfig, tokenizer: TokenizerInfo, say: Say
) -> Callable[[torch.nn.Module], None]:
    """Check ``source`` against this run (its ``model`` config and ``tokenizer``) and return the
    function that loads this rank's weights into a freshly built model."""
    ck = open_checkpoint(source)
    check_compatible(ck, model, say)
    if ck.state.tokenizer.sha256 != tokenizer.sha256:
        raise CheckpointError(
            f"checkpoint.init_from {ck.tag_dir} was made with tokenizer sha256 "
            f"{ck.state.tokenizer.sha256[:16]}… ({ck.state.tokenizer.vocab_size} tokens), this "
            f"run's data.manifest with sha256 {tokenizer.sha256[:16]}… ({tokenizer.vocab_size} "
            "tokens): the same ids would mean other text; tokenize the data with the source's "
            "tokenizer (its checkpoint holds it)"
        )
    return partial(load_weights, ck, say)


def check_compatible(ck: Checkpoint, model: ModelConfig, say: Say) -> None:
    """Refuse a source whose parameters have other shapes; name the other differences."""
    theirs, ours = shape_signature(ck.model), shape_signature(model)
    wrong = [k for k in ours if theirs[k] != ours[k]]
    if wrong:
        details = ", ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in wrong)
        raise CheckpointError(
            f"checkpoint.init_from {ck.tag_dir}: its weights do not fit this model ({details}); "
            "a run started from a checkpoint keeps its parameter shapes (attention variants, "
            "dropout, sequence length with RoPE and the like may change)"
        )
    saved, mine = to_dict(ck.model), to_dict(model)
    changed = [f"{k} {saved[k]!r} -> {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
    if changed:
        say(
            f"[train] init_from: this run's model differs from {ck.tag_dir} in {', '.join(changed)}"
        )


def load_weights(ck: Checkpoint, say: Say, model: torch.nn.Module) -> None:
    """Load this rank's part of ``ck`` into ``model`` (a fresh ``build_gpt``; collective: every
    rank calls it)."""
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    new, dropped = _difference(ck, set(mine))  # the one collective: before any local refusal
    source = _source_part(ck, model, set(mine))
    for name, tensor in source.items():
        if tuple(tensor.shape) != tuple(mine[name].shape):
            raise CheckpointError(
                f"checkpoint.init_from {ck.tag_dir}: {name} has shape {list(tensor.shape)} "
                f"there, {list(mine[name].shape)} here"
            )
    missing, unexpected = model.load_state_dict(source, strict=False)
    missing = sorted(k for k in missing if not k.endswith("_extra_state"))
    if unexpected or set(missing) - set(new):
        raise CheckpointError(
            f"checkpoint.init_from {ck.tag_dir}: weights do not fit (missing {missing[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    if new:
        say(
            f"[train] init_from: {len(new)} parameters not in {ck.tag_dir} keep their "
            f"initialisation from the run seed: {', '.join(new)}"
        )
    if dropped:
        say(f"[train] init_from: {len(dropped)} parameters of {ck.tag_dir} are not in this model "
            f"and are left out: {', '.join(dropped)}")  # fmt: skip
    say(f"[train] init_from: weights of {ck.tag_dir} (step {ck.step}, {ck.state.origin})")


def _difference(ck: Checkpoint, mine: set[str]) -> tuple[list[str], list[str]]:
    """Parameter names (whole model, every rank's stage) only this model has, and only the
    source has; both may only be a variant's own."""
    every: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    ours = set().union(*every) - {TIED_COPY}  # type: ignore[arg-type]
    theirs = set(ck.state.tp_layout) - {TIED_COPY}
    new, dropped = sorted(ours - theirs), sorted(theirs - ours)
    odd = [n for n in new + dropped if VARIANT_PARAMETERS not in n]
    if odd:
        raise CheckpointError(
            f"checkpoint.init_from {ck.tag_dir}: parameter {odd[0]} is in only one of the two "
            "models (only an attention variant's own parameters may differ)"
        )
    return new, dropped


def _source_part(
    ck: Checkpoint, model: torch.nn.Module, names: set[str]
) -> dict[str, torch.Tensor]:
    """The source's tensors for this rank's ``names``: its own shard file when it was saved at
    this TP × PP (ZeRO 0–2), else cut from the TP=1 merge with this model's TP layout."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    same = ck.weights is None and ck.zero_stage < 3
    if same and (ck.tensor_parallel, ck.pipeline_parallel) == (tp, pp):
        saved = saved_shard(ck, stage * tp + rank)
        return {k: v for k, v in saved.items() if k in names}
    full = full_state_dict(ck)
    if TIED_COPY in names and TIED_COPY not in full:  # the last stage's copy of a tied embedding
        full[TIED_COPY] = full["embedding.word_embeddings.weight"]
    params = dict(model.named_parameters())
    return {
        k: shard(v, split_of(params[k]), rank, tp).clone() for k, v in full.items() if k in names
    }
