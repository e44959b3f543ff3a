"""Write a planned Hugging Face import (``hf_import.plan_import``) as a twicing-lm checkpoint at
step 0, streaming the weights.

For each pipeline stage and TP rank, every tensor of that shard is read from the (memory-mapped)
source, joined by the adapter's table, checked against the shape the config implies, cut to the
rank's part and written as ``mp_rank_{stage·TP + rank}_model_states.pt`` (DeepSpeed's
model-states layout, ``{"module": …}``, global layer names), so no more than one shard and one
full tensor are in memory. Parameters the source lacks (a retrofit that adds some: Neural
Attention's scorers) are drawn exactly as ``build_gpt`` draws them from the run seed, one layer
at a time. Then the tokenizer, ``trainer_state.json`` (``origin: import``), ``checksums.json``,
``COMPLETE`` and ``latest``, as a training save leaves them, so every reader of checkpoints
opens an import unchanged. All of it goes into a staging directory that replaces ``--out`` once
complete: a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from data_prep.base.atomic_write import write_bytes, write_text
from data_prep.base.errors import CheckpointError, ConfigError
from data_prep.base.strict_config import to_dict
from model import ModelConfig
from model.pipeline_stages import stage_of_parameter
from model.tp_layout import Split, layout_of, shard
from pretrain.checkpoint import layout
from pretrain.checkpoint.state import TokenizerInfo, Topology, TrainerState
from pretrain.export.hf_import import ImportPlan
from pretrain.export.hf_weights import NOT_PARAMETERS, HFWeights
from pretrain.export.import_dir import PRESET, RECORD, is_earlier_import
from pretrain.export.mapping import Pair, from_hf

EMBEDDING = "embedding.word_embeddings.weight"
TIED_COPY = "output_layer.weight"  #: the last pipeline stage's copy of a tied embedding


def skeleton(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, Split]]:
    """Shapes and TP layouts of our TP=1 model's parameters, built on the meta device (no
    memory; needs megatron's ``parallel_state`` at TP=1, PP=1)."""
    from model import build_gpt

    with torch.device("meta"):
        model = build_gpt(cfg)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    return shapes, layout_of(model)


class Tensors:
    """Our TP=1 tensors of a planned import, made one at a time: from the source through the
    adapter's table, or (parameters the source lacks) drawn from the run seed."""

    def __init__(self, plan: ImportPlan, weights: HFWeights) -> None:
        self.plan, self.weights = plan, weights
        self.pairs: dict[str, Pair] = {p.ours: p for p in plan.adapter.pairs(plan.model)}
        self.recipes = from_hf(list(self.pairs.values()), weights.take)
        self.shapes, self.layout = skeleton(plan.model)
        self.fresh_names = sorted(set(self.shapes) - set(self.recipes))
        self._fresh: dict[str, torch.Tensor] = {}
        self._check_names()

    # ------------------------------------------------------------------ checks
    def _check_names(self) -> None:
        """Every tensor the table needs is there, every one there has a place, and the names
        the source lacks are a retrofit's new parameters only."""
        needed = {n for p in self.pairs.values() for n in p.theirs}
        missing = sorted(n for n in needed if self.weights.resolve(n) is None)
        if missing:
            files = sorted({p.name for p in self.weights.where.values()})
            raise CheckpointError(
                f"{self.plan.source}: tensor {missing[0]!r} (and {len(missing) - 1} more) is "
                f"missing from {files}, but {self.plan.hf.path} describes a model with it"
            )
        used = {self.weights.resolve(n) for n in needed}
        extra = sorted(n for n in self.weights.names() - used if not n.endswith(NOT_PARAMETERS))
        extra = [n for n in extra if not self._tied_duplicate(n)]
        if extra:
            raise ConfigError(
                f"{self.weights.file_of(extra[0])}: tensor {extra[0]!r} (and {len(extra) - 1} "
                f"more) has no place in the model {self.plan.hf.path} describes (a bias or "
                "weight its config does not declare): not imported"
            )
        odd = sorted(set(self.recipes) - set(self.shapes))
        odd += [n for n in self.fresh_names if ".core_attention." not in n]
        if odd:
            raise CheckpointError(f"the import adapter and the model disagree on {odd[:3]}")

    def _tied_duplicate(self, name: str) -> bool:
        """A tied model's ``lm_head.weight`` saved anyway: allowed when it is the embedding."""
        if not self.plan.model.tied_embeddings or name != "lm_head.weight":
            return False
        embedding = self.pairs[EMBEDDING].theirs[0]
        if torch.equal(self.weights.take(name), self.weights.take(embedding)):
            return True
        self.plan.hf.refuse(
            "tie_word_embeddings",
            f"the embeddings are tied, but {name} in {self.weights.file_of(name)} differs from "
            f"{embedding}",
        )

    # ------------------------------------------------------------------ tensors
    def full(self, name: str) -> torch.Tensor:
        """Our TP=1 tensor ``name`` (float32), its shape checked against the config's."""
        if name in self.fresh_names:
            return self._fresh_tensor(name)
        try:
            tensor = self.recipes[name]().to(torch.float32)
        except RuntimeError as e:
            raise self._shape_error(name, f"cannot be joined ({e})") from None
        if tuple(tensor.shape) != self.shapes[name]:
            raise self._shape_error(name, f"give {list(tensor.shape)}")
        return tensor

    def _shape_error(self, name: str, what: str) -> CheckpointError:
        pair = self.pairs[name]
        shapes = ", ".join(f"{n} {list(self.weights.shape(n))}" for n in pair.theirs)
        file = self.weights.file_of(pair.theirs[0])
        return CheckpointError(
            f"{file}: {shapes} {what}, but {self.plan.hf.path} implies {name} "
            f"{list(self.shapes[name])}: the tensors do not match the config"
        )

    def _fresh_tensor(self, name: str) -> torch.Tensor:
        if name not in self._fresh:
            self._fresh = self._draw_layer(int(name.split(".")[2]))
        return self._fresh[name]

    def _draw_layer(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s new parameters, drawn as ``build_gpt`` draws them from the seed."""
        from model.gpt import initial_layer

        layer = initial_layer(self.plan.model, index, self.plan.seed)
        prefix = f"decoder.layers.{index}."
        return {
            prefix + k: v.detach().to(torch.float32)
            for k, v in layer.state_dict().items()
            if prefix + k in self.fresh_names
        }

    def tp_layout(self) -> dict[str, dict]:
        """The TP layout ``trainer_state.json`` records (all stages, the tied copy included)."""
        splits = dict(self.layout)
        if self.plan.pipeline > 1 and self.plan.model.tied_embeddings:
            splits[TIED_COPY] = splits[EMBEDDING]
        return {k: v.to_json() for k, v in splits.items()}


# ---------------------------------------------------------------------------- writing
def write_import(plan: ImportPlan, out: str | Path, versions: dict[str, str]) -> dict:
    """Write ``plan`` as the run directory ``out`` (checked by ``import_dir.check_import_dir``);
    returns the record written beside the checkpoints."""
    out = Path(out).resolve()
    tensors = Tensors(plan, HFWeights(plan.source))  # refusals before anything is written
    created = _make_parents(out)
    staging = out.parent / f".{out.name}.import-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tag_dir = staging / "checkpoints" / layout.tag_of(0)
        tag_dir.mkdir(parents=True)
        for stage in range(plan.pipeline):
            for rank in range(plan.tensor):
                _write_shard(tensors, stage, rank, tag_dir)
        _write_tokenizer(plan, tag_dir)
        state = trainer_state(plan, tensors, versions)
        write_text(tag_dir / layout.STATE, json.dumps(state.to_json(), indent=1))
        _complete(tag_dir)
        record = _record(plan, tensors)
        write_text(staging / RECORD, json.dumps(record, indent=1))
        write_text(staging / PRESET, training_preset(plan, out))
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(created):
            d.rmdir()
        raise
    return record


def _make_parents(out: Path) -> list[Path]:
    """Create ``out``'s missing parents; returns them (removed again if the import fails)."""
    missing = [p for p in reversed(out.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def _part(full: torch.Tensor, split: Split, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` in storage of its own (a view would save all of it)."""
    return shard(full, split, rank, tp).clone(memory_format=torch.contiguous_format)


def _write_shard(tensors: Tensors, stage: int, rank: int, tag_dir: Path) -> None:
    plan = tensors.plan
    tp, pp, cfg = plan.tensor, plan.pipeline, plan.model
    module = {
        name: _part(tensors.full(name), tensors.layout[name], rank, tp)
        for name in tensors.shapes
        if stage_of_parameter(name, cfg.num_layers, pp) == stage
    }
    if pp > 1 and cfg.tied_embeddings and stage == pp - 1:
        module[TIED_COPY] = _part(tensors.full(EMBEDDING), tensors.layout[EMBEDDING], rank, tp)
    path = tag_dir / f"mp_rank_{stage * tp + rank:02d}_model_states.pt"
    layout.torch_save({"module": module}, path)


def _write_tokenizer(plan: ImportPlan, tag_dir: Path) -> None:
    for name, src in layout.tokenizer_files(plan.tokenizer)[1].items():
        write_bytes(tag_dir / name, Path(src).read_bytes(), fsync=False)


def trainer_state(plan: ImportPlan, tensors: Tensors, versions: dict[str, str]) -> TrainerState:
    """The import's ``trainer_state.json``: step 0, the model's config, ``origin: import``."""
    tok = plan.tokenizer
    return TrainerState(
        step=0,
        consumed_samples=0,
        config={
            "model": to_dict(plan.model),
            "parallel": {"tensor": plan.tensor, "pipeline": plan.pipeline},
            "training": {"seed": plan.seed},
        },
        topology=Topology(tensor=plan.tensor, data=1, zero_stage=0, pipeline=plan.pipeline),
        tp_layout=tensors.tp_layout(),
        tokenizer=TokenizerInfo(
            layout.tokenizer_files(tok)[0], tok.sha256, tok.vocab_size, tok.eod
        ),
        versions=versions,
        origin="import",
    )


def _complete(tag_dir: Path) -> None:
    """Checksums of every file, then the marker, then ``latest``: as a training save."""
    names = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file())
    digests = {n: layout.file_digest(tag_dir / n) for n in names}
    write_text(tag_dir / layout.CHECKSUMS, json.dumps(digests, indent=1, sort_keys=True))
    write_text(tag_dir / layout.MARKER, f"{tag_dir.name}\n")
    write_text(tag_dir.parent / layout.LATEST, tag_dir.name)


def _record(plan: ImportPlan, tensors: Tensors) -> dict:
    return {
        "source": str(plan.source.resolve()),
        "model_type": plan.hf.get("model_type"),
        "architectures": plan.hf.get("architectures"),
        "overrides": list(plan.overrides),
        "topology": {"tensor": plan.tensor, "pipeline": plan.pipeline},
        "seed": plan.seed,
        "parameters": sum(_numel(s) for s in tensors.shapes.values()),
        "new_parameters": tensors.fresh_names,
        "tokenizer": layout.tokenizer_files(plan.tokenizer)[0],
    }


def training_preset(plan: ImportPlan, out: Path) -> str:
    """``train.yaml``: the imported model and ``checkpoint.init_from`` (a run needs ``run_dir``
    and a ``data.manifest`` tokenized with the import's tokenizer on top)."""
    import yaml

    preset = {"model": to_dict(plan.model), "checkpoint": {"init_from": str(out)}}
    return (
        f"# a run that starts from the import {out} (pretrain.import_hf of {plan.source}):\n"
        f"#   python -m pretrain.train --config {out / PRESET} run_dir=NEW "
        "data.manifest=MANIFEST [dotted.key=value ...]\n"
        "# MANIFEST: data tokenized with this import's tokenizer (its checkpoint holds it)\n"
        + yaml.safe_dump(preset, sort_keys=False)
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _replace(out: Path, staging: Path) -> None:
    """Move the finished import into place (replacing an earlier one or an empty directory)."""
    if out.exists():
        if is_earlier_import(out):
            shutil.rmtree(out)
        else:
            out.rmdir()  # checked empty before anything was read
    os.replace(staging, out)
