"""Hugging Face imports at TP2 and PP2 and as the start of real training runs (gloo ranks,
DeepSpeed): the logits of every architecture equal the HF model's at TP2 and PP2 (≤ 1e-5), from
the import written at that layout and cut from the TP=1 import alike (the same weights, bit for
bit); ``python -m pretrain.train ... checkpoint.init_from=IMPORT`` (the import's ``train.yaml``)
starts each at another TP × PP × DP × ZeRO with the HF model's loss on its first batch; a
softmax Llama retrofitted with twicing (and NeuTRENO, ResFormer) trains at TP2 from the import's
weights and its custom-code export gives the trained model's logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import need_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = need_module("transformers")

import hf_models  # noqa: E402

from launch import run  # noqa: E402
from pretrain_runs import losses  # noqa: E402

#: how each architecture's first-step run is laid out (2 ranks): TP, PP, DP × every ZeRO stage
LAYOUTS = {
    "llama-gqa-untied": ["parallel.tensor=2", "parallel.zero_stage=1"],
    "llama-tied-bias": ["parallel.pipeline=2", "parallel.zero_stage=0"],
    "mistral": ["parallel.zero_stage=2"],
    "qwen2": ["parallel.tensor=2", "parallel.zero_stage=0"],
    "gpt2": ["parallel.zero_stage=3"],
}
TRAIN = ["model.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=8",
         "training.log_interval=1", "training.eval_interval=0", "checkpoint.interval=0",
         "training.timeout_minutes=3", "optimizer.warmup_steps=2", "optimizer.lr=3e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, wikitext_manifest):
    root = tmp_path_factory.mktemp("hf-models")
    tok = hf_models.tokenizer_model(wikitext_manifest)
    return {name: hf_models.make(name, root / name, tok) for name in hf_models.ARCHS}


@pytest.fixture(scope="module")
def imports(hf_dirs, tmp_path_factory, one_rank):
    """ROOT/ARCH/{tp1,tp2,pp2}: every architecture imported at three layouts."""
    root = tmp_path_factory.mktemp("imports")
    layouts = {"tp1": [], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}
    for name, hf in hf_dirs.items():
        for layout, overrides in layouts.items():
            hf_models.import_here(hf, root / name / layout, *overrides)
    return root


def train(import_dir, run_dir, manifest, *overrides: str, steps: int = 1):
    argv = ["-m", "pretrain.train", "--config", str(import_dir / "train.yaml"),
            f"run_dir={run_dir}", f"data.manifest={manifest}", *TRAIN,
            f"training.train_steps={steps}", *overrides]  # fmt: skip
    return run(argv, 2, timeout=600)


def first_batch(import_dir, run_dir, manifest, *overrides: str) -> list[dict]:
    """The run's first global batch, rebuilt with its own dataset code and cached indices, as
    its micro-batches."""
    from pretrain.train_config import load_config
    from pretrain.training.data import build_datasets, load_data

    argv = [f"run_dir={run_dir}", f"data.manifest={manifest}", *TRAIN, *overrides]
    cfg = load_config(import_dir / "train.yaml", argv)
    tokenizer, blend = load_data(cfg)
    train_ds, _ = build_datasets(tokenizer, blend, cfg)
    micro, g = cfg.training.micro_batch_size, cfg.training.global_batch_size
    samples = [train_ds[i] for i in range(g)]
    return [
        {k: torch.stack([s[k] for s in samples[j : j + micro]]) for k in ("tokens", "labels",
                                                                          "loss_mask")}
        for j in range(0, g, micro)
    ]  # fmt: skip


def mean_loss(logits_of, batches: list[dict]) -> float:
    """The trainer's step loss: the mean over micro-batches of each one's masked mean."""
    means = []
    for b in batches:
        with torch.no_grad():
            logits = logits_of(b["tokens"]).float()
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), b["labels"].flatten(), reduction="none"
        )
        mask = b["loss_mask"].flatten().float()
        means.append((per_token * mask).sum() / mask.sum())
    return torch.stack(means).mean().item()


# ------------------------------------------------------------------------------ TP2 / PP2
def test_logits_equal_the_hf_models_at_tp2_and_pp2(imports, hf_dirs, tmp_path):
    ids = hf_models.random_ids()
    expected = {"ids": ids, "logits": {n: hf_models.logits(d, ids) for n, d in hf_dirs.items()}}
    torch.save(expected, imports / "expected.pt")
    run(["tests/workers/import_logits.py", str(imports), str(tmp_path)], 2, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in hf_dirs:
        for layout, ranks_with_logits in (("tp2", (0, 1)), ("pp2", (1,))):
            key = f"{name} {layout}"
            diffs = [ranks[r][key]["diff"] for r in ranks_with_logits]
            print(f"{key}: max |logit diff| {max(diffs):.3g}")
            assert all(d is not None and d <= 1e-5 for d in diffs), (key, diffs)
            assert all(ranks[r][key]["same_weights"] for r in range(2)), key


# ------------------------------------------------------------------------------ init_from
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_step_loss_is_the_hf_models(name, imports, hf_dirs, wikitext_manifest, tmp_path):
    """``checkpoint.init_from`` through the real ``pretrain.train`` (2 ranks, each architecture
    at another layout): the first logged loss is the HF model's on the same batch, the run is a
    new one (step 1 of its own), and it says where its weights came from."""
    source, run_dir = imports / name / "tp1", tmp_path / "run"
    (rc, out), _ = train(source, run_dir, wikitext_manifest, *LAYOUTS[name])
    assert (
        f"[train] init_from: weights of {source}/checkpoints/step_00000000 (step 0, import)" in out
    )
    batches = first_batch(source, run_dir, wikitext_manifest, *LAYOUTS[name])
    hf = hf_models.load(hf_dirs[name])
    theirs = mean_loss(lambda t: hf(input_ids=t).logits, batches)
    ours = losses(run_dir)[1]
    print(f"{name} {' '.join(LAYOUTS[name])}: first loss {ours:.7f}, HF {theirs:.7f}")
    assert abs(ours - theirs) <= 1e-5
    state = json.loads((run_dir / "checkpoints/step_00000001/trainer_state.json").read_text())
    assert state["origin"] == "train" and state["step"] == 1
    if name == "mistral":  # a second start resumes the run's own checkpoint, not init_from
        (rc, out), _ = train(source, run_dir, wikitext_manifest, *LAYOUTS[name], steps=2)
        assert "has checkpoints: resuming them (checkpoint.init_from=" in out
        assert "resumed from step_00000001" in out and sorted(losses(run_dir)) == [1, 2]


# ------------------------------------------------------------------------------ retrofit
RETROFITS = {
    "twicing": ["model.attention=twicing", "model.attention_layers=last:2"],
    "neutreno": ["model.attention=neutreno"],
    "resformer": ["model.attention=resformer"],
}


@pytest.mark.parametrize("variant", list(RETROFITS))
def test_retrofit_trains_at_tp2_and_exports_our_logits(
    variant, hf_dirs, wikitext_manifest, tmp_path, one_rank
):
    """A softmax Llama imported with another attention trains 20 steps (twicing; 6 for the
    others) at TP2 from the import's weights (its first loss is the one our TP=1 model of the
    import gives on that batch, not the softmax model's), learns, and the custom-code export of
    the trained checkpoint gives its logits."""
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.export.hf_export import export

    source = hf_models.import_here(hf_dirs["llama-gqa-untied"], tmp_path / "import",
                                   *RETROFITS[variant])  # fmt: skip
    steps = 20 if variant == "twicing" else 6
    run_dir = tmp_path / "run"
    train(source, run_dir, wikitext_manifest, "parallel.tensor=2", steps=steps)
    batches = first_batch(source, run_dir, wikitext_manifest)

    def logits_of(ck):
        return lambda t: hf_models.our_logits(ck, t)

    start = mean_loss(logits_of(open_checkpoint(source)), batches)
    plain = hf_models.import_here(hf_dirs["llama-gqa-untied"], tmp_path / "plain")
    assert abs(mean_loss(logits_of(open_checkpoint(plain)), batches) - start) > 1e-4
    loss = losses(run_dir)
    print(f"{variant}: first loss {loss[1]:.7f} (import: {start:.7f}), last {loss[steps]:.4f}")
    assert abs(loss[1] - start) <= 1e-5
    assert loss[steps] < loss[1] - 0.05

    trained = open_checkpoint(run_dir)
    assert trained.step == steps and trained.model.attention == variant
    meta = export(trained, tmp_path / "hf")
    assert meta["architecture"] == "TwicingForCausalLM"
    ids = hf_models.random_ids()
    ours = hf_models.our_logits(trained, ids)
    theirs = hf_models.logits(tmp_path / "hf", ids, trust_remote_code=True)
    assert (ours - theirs).abs().max().item() <= 1e-5
