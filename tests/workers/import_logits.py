"""Worker: for every imported architecture under ROOT, at TP2 and then at PP2 (2 ranks), build
the model, load this rank's weights the way ``checkpoint.init_from`` does, both from the import
written at that layout (its own shard files) and from the TP=1 import (cut here), and compute
the logits of the expected file's token ids. Each rank writes what it saw to OUT/rank{r}.json:
the largest difference to the Hugging Face logits, and whether both loads gave the same weights
bit for bit.

Usage: python tests/workers/import_logits.py ROOT OUT
(ROOT/expected.pt: {"ids": …, "logits": {arch: …}}; ROOT/ARCH/{tp1,tp2,pp2}: the imports)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model import build_gpt, megatron_compat
from pretrain.checkpoint.init_from import load_weights
from pretrain.checkpoint.reader import open_checkpoint


def loaded(run: Path) -> torch.nn.Module:
    ck = open_checkpoint(run)
    torch.manual_seed(0)
    model = build_gpt(ck.model)
    load_weights(ck, lambda _line: None, model)
    return model.eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    names = [k for k in sa if not k.endswith("_extra_state")]
    return sorted(names) == sorted(k for k in sb if not k.endswith("_extra_state")) and all(
        torch.equal(sa[k], sb[k]) for k in names
    )


@torch.no_grad()
def tp_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits at TP > 1 (each rank computed its vocabulary slice)."""
    part = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    parts = [torch.empty_like(part) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, part.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def pp_logits(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Logits on the last of two stages (None on the first), hidden states sent point to point."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if ps.is_pipeline_first_stage():
        hidden = model(ids, positions, None).contiguous()
        dist.send(hidden, ps.get_pipeline_model_parallel_next_rank())
        return None
    received = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
    dist.recv(received, ps.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(received)
    return model(ids, positions, None)


def main(root: str, out: str) -> None:
    dist.init_process_group("gloo")
    megatron_compat.install()
    expected = torch.load(Path(root) / "expected.pt", weights_only=True)
    ids = expected["ids"]
    seen: dict[str, dict] = {}
    for layout, sizes in (("tp2", {"tensor_model_parallel_size": 2}),
                          ("pp2", {"pipeline_model_parallel_size": 2})):  # fmt: skip
        ps.initialize_model_parallel(**sizes)
        for arch, hf in expected["logits"].items():
            here, cut = loaded(Path(root, arch, layout)), loaded(Path(root, arch, "tp1"))
            logits = tp_logits(here, ids) if layout == "tp2" else pp_logits(here, ids)
            seen[f"{arch} {layout}"] = {
                "diff": None if logits is None else (logits - hf).abs().max().item(),
                "same_weights": same_weights(here, cut),
            }
        ps.destroy_model_parallel()
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(seen, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
