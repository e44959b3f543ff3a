"""Consolidation: a TP=2 checkpoint becomes one TP=1 weights file that gives the sharded model's
logits, and that evaluation reads like the checkpoint it came from.

Run as a script (``python tests/test_consolidate.py CKPT OUT``, one process per TP rank) it is the
worker computing the *sharded* model's logits: each rank loads its own saved TP shard (no merge)
and the vocabulary-parallel logits are gathered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: a SwiGLU (stride-2 fc1), grouped-query, untied softmax GPT with biases and padded vocabulary
MODEL = [
    "model.attention=softmax",
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.num_query_groups=2",
    "model.tied_embeddings=false",
    "model.vocab_pad_multiple=96",
]


def probe_tokens(vocab: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (3, seq), generator=g)


def sharded_logits_worker(checkpoint: str, out: str) -> None:
    """One TP rank: this rank's saved shard, forward, gather the vocab-parallel logits."""
    import os

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    from model import megatron_compat

    megatron_compat.install()
    from pretrain.checkpoint.load_model import load_model
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(checkpoint)
    assert ck.tensor_parallel == tp and ck.zero_stage < 3  # its own shards, read as saved
    model = load_model(ck, dist.get_rank(), tp)
    x = probe_tokens(ck.model.vocab_size, ck.model.seq_length)
    with torch.no_grad():
        local = model(x, torch.arange(x.shape[1]).expand_as(x), None)  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous())
    if dist.get_rank() == 0:
        torch.save({"logits": torch.cat(parts, dim=-1), "pid": os.getpid()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sharded_logits_worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


import pytest  # noqa: E402
import torch  # noqa: E402

from launch import run  # noqa: E402
from pretrain_runs import train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2_run(wikitext_manifest, tmp_path_factory):
    """The model above trained at TP=2 × DP=1, ZeRO-2 (checkpoint at step 3)."""
    run_dir = tmp_path_factory.mktemp("consolidate") / "tp2"
    train(
        run_dir,
        wikitext_manifest,
        2,
        *MODEL,
        "parallel.tensor=2",
        "parallel.zero_stage=2",
        "training.train_steps=3",
        "checkpoint.interval=3",
    )
    return run_dir


@pytest.fixture(scope="module")
def consolidated(tp2_run):
    out = tp2_run.parent / "model.pt"  # beside the run: inside it is refused (issue 15)
    ((rc, output),) = run(
        ["-m", "pretrain.consolidate", "--checkpoint", str(tp2_run), "--out", str(out)], 1
    )
    assert rc == 0 and "consolidated" in output and out.is_file()
    return out


def test_consolidated_file_is_self_contained(tp2_run, consolidated):
    from pretrain.checkpoint.layout import read_state

    payload = torch.load(consolidated, map_location="cpu", weights_only=True)
    tag_dir = tp2_run / "checkpoints/step_00000003"
    state = read_state(tag_dir).to_json()
    assert payload["format"] == "twicing-lm/consolidated" and payload["format_version"] == 2
    assert payload["step"] == 3 and payload["consumed_samples"] == 24
    assert payload["trainer_state"] == state and payload["dtype"] == "float32"
    sd = payload["state_dict"]
    assert set(sd) == set(state["tp_layout"])  # every parameter, no _extra_state
    assert sd["embedding.word_embeddings.weight"].shape[0] == 1056  # padded: 1024 → 11 × 96
    assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128, 64)  # full TP=1
    assert all(v.dtype == torch.float32 for v in sd.values())
    model_bytes = (tag_dir / "tokenizer.model").read_bytes()
    # version 2 carries the tokenizer's files by name; version-1 readers still find the model
    assert {k: v.numpy().tobytes() for k, v in payload["tokenizer_files"].items()} == {
        "tokenizer.model": model_bytes
    }
    assert payload["tokenizer_model"].numpy().tobytes() == model_bytes


def test_consolidated_weights_give_the_sharded_models_logits(
    tp2_run, consolidated, tmp_path, one_rank
):
    from pretrain.checkpoint.load_model import load_model
    from pretrain.checkpoint.reader import open_checkpoint

    out = tmp_path / "sharded.pt"
    run([str(Path(__file__)), str(tp2_run / "checkpoints/step_00000003"), str(out)], 2)
    sharded = torch.load(out, weights_only=True)["logits"]

    ck = open_checkpoint(consolidated)
    assert ck.tensor_parallel == 1 and ck.weights is not None
    model = load_model(ck, 0, 1)
    x = probe_tokens(ck.model.vocab_size, ck.model.seq_length)
    with torch.no_grad():
        tp1 = model(x, torch.arange(x.shape[1]).expand_as(x), None)
    assert tp1.shape == sharded.shape == (3, 64, 1056)
    diff = (tp1 - sharded).abs().max().item()
    print(f"consolidated TP=1 vs sharded TP=2 logits: max |diff| = {diff:.3g}")
    assert diff <= 1e-6
    assert sharded.abs().max() > 0.1  # a real signal, not zeros


EVAL = ["-m", "pretrain.evaluate", "--data", "wikitext-2:valid", "--max-documents", "2"]


def test_evaluation_of_the_file_matches_the_checkpoint(tp2_run, consolidated, tmp_path):
    common = [*EVAL, "--no-progress", "--no-oversmoothing"]
    a, b = tmp_path / "ckpt.json", tmp_path / "file.json"
    run([*common, "--checkpoint", str(tp2_run), "--out", str(a)], 1)
    run([*common, "--checkpoint", str(consolidated), "--out", str(b)], 1)
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["tokens"] == rb["tokens"] > 1000 and ra["step"] == rb["step"] == 3
    assert rb["token_ppl"] == ra["token_ppl"]  # the same weights, the same numbers
    assert rb["checkpoint"] == str(consolidated)


def test_bf16_file_and_errors(tp2_run, tmp_path):
    from pretrain.checkpoint.consolidated import load
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint
    from pretrain.consolidate import consolidate, main

    ck = open_checkpoint(tp2_run)
    out = consolidate(ck, tmp_path / "bf16.pt", dtype="bf16")
    sd = load(out)["state_dict"]
    full = full_state_dict(ck)
    assert all(sd[k].dtype == torch.bfloat16 for k in sd)
    assert all(torch.equal(sd[k], full[k].to(torch.bfloat16)) for k in full)

    incomplete = tmp_path / "incomplete" / "checkpoints"
    (incomplete / "step_00000001").mkdir(parents=True)
    assert main(["--checkpoint", str(incomplete / "step_00000001"), "--out", "x.pt"]) == 4
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="not a readable consolidated checkpoint"):
        open_checkpoint(tmp_path / "junk.pt")
