"""Context parallelism through the real entry point (megatron-core, DeepSpeed, gloo): every
attention variant at CP 2 and CP 4 in both modes, and the axes composing (TP × CP, CP × PP,
CP × DP at ZeRO-1/2, TP + SP × PP, TP + SP × CP × PP on 8 ranks), train the single-rank curve
(≤ 1e-6 relative, 10 steps, fp32, dropout 0) and end at its weights (≤ 1e-5); a CP run resumes
bit-exactly after kill -9 and reshards to CP 1 and CP 4; evaluation reads a CP run as it is."""

from __future__ import annotations

import json
import signal

import pytest

from launch import run
from pretrain_runs import (
    finish,
    losses,
    output,
    signal_all,
    start,
    train,
    wait_for,
    weights_differ,
)

pytestmark = pytest.mark.slow

STEPS = 10
#: 8 query heads over 4 key/value groups (Ulysses at CP 4 splits both), 2 layers, seq 64; the
#: learning rate decays over 12 steps in every run, however long it trains (the reshard sources
#: train 2 steps past their checkpoint, and a resharded resume continues that schedule)
BASE = ["model.num_attention_heads=8", "model.num_query_groups=4", f"training.train_steps={STEPS}",
        f"optimizer.decay_steps={STEPS + 2}"]  # fmt: skip
HEADS, GROUPS, HIDDEN = 8, 4, 64
VARIANTS = ("softmax", "twicing", "neutreno", "neural")
#: name: (ranks, overrides, variant)
LAYOUTS = {
    **{
        f"{v}-CP{c}-{mode}": (c, [f"parallel.context={c}", f"parallel.context_mode={mode}"], v)
        for v in VARIANTS
        for c in (2, 4)
        for mode in ("allgather", "ulysses")
    },
    "twicing-TP2xCP2": (4, ["parallel.tensor=2", "parallel.context=2"], "twicing"),
    "neutreno-CP2xPP2": (
        4, ["parallel.context=2", "parallel.pipeline=2", "parallel.context_mode=ulysses"],
        "neutreno",
    ),
    "twicing-CP2xDP2-ZeRO1": (4, ["parallel.context=2", "parallel.zero_stage=1"], "twicing"),
    "twicing-CP2xDP2-ZeRO2": (4, ["parallel.context=2", "parallel.zero_stage=2"], "twicing"),
    "neutreno-TP2+SPxPP2": (
        4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"],
        "neutreno",
    ),
    "twicing-TP2+SPxCP2xPP2": (
        8, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2",
            "parallel.pipeline=2"],
        "twicing",
    ),
}  # fmt: skip


#: the reshard sources run 2 steps past their step-10 checkpoint: the curve a resharded resume
#: must continue
RESHARD_SOURCES = ("twicing", "twicing-CP2-allgather")
PAST = [f"training.train_steps={STEPS + 2}", f"checkpoint.interval={STEPS}"]


def _weights(run_dir, step=STEPS):
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint

    return full_state_dict(open_checkpoint(run_dir, f"step_{step:08d}"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, wikitext_manifest):
    """{name: run dir}: the single-rank reference of each variant, then every layout."""
    root = tmp_path_factory.mktemp("cp")
    out = {}
    for v in VARIANTS:
        out[v] = root / v
        past = PAST if v in RESHARD_SOURCES else []
        train(out[v], wikitext_manifest, 1, *BASE, f"model.attention={v}", *past)
    for name, (ranks, overrides, v) in LAYOUTS.items():
        out[name] = root / name
        past = PAST if name in RESHARD_SOURCES else []
        train(out[name], wikitext_manifest, ranks, *BASE, f"model.attention={v}", *overrides,
              *past)  # fmt: skip
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_the_single_rank_curve_and_reaches_its_weights(runs, name):
    variant = LAYOUTS[name][2]
    steps = range(1, STEPS + 1)
    reference, got = (
        {s: v for s, v in losses(runs[r]).items() if s in steps} for r in (variant, name)
    )
    assert sorted(reference) == list(steps) and got.keys() == reference.keys()
    worst = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= 1e-6, f"{name}: losses differ by {worst:.2e} relative"
    # the merged weights as evaluate/generate/export/consolidate read them
    differ = weights_differ(_weights(runs[name]), _weights(runs[variant]), HEADS, GROUPS, HIDDEN)
    assert not differ, differ


def test_cp_runs_record_their_layout(runs):
    tag = runs["twicing-TP2+SPxCP2xPP2"] / f"checkpoints/step_{STEPS:08d}"
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["topology"] == {"tensor": 2, "data": 1, "zero_stage": 1, "pipeline": 2,
                                 "context": 2}  # fmt: skip
    log = (runs["twicing-TP2+SPxCP2xPP2"] / "config.yaml").read_text()
    assert "context: 2" in log and "context_mode: allgather" in log


def test_evaluate_reads_a_cp_run_as_the_single_rank_one(runs, tmp_path):
    from conftest import need_shared

    wikitext = need_shared("data", "wikitext")
    reports = {}
    for name in ("twicing", "twicing-CP4-ulysses"):
        out = tmp_path / f"{name}.json"
        run(["-m", "pretrain.evaluate", "--checkpoint", str(runs[name]), "--tag",
             f"step_{STEPS:08d}", "--data", "wikitext-2:valid", "--wikitext", str(wikitext),
             "--max-documents", "2", "--out", str(out), "--no-progress", "--no-oversmoothing"],
            1)  # fmt: skip
        reports[name] = json.loads(out.read_text())
    a, b = (reports[n]["token_ppl"] for n in ("twicing", "twicing-CP4-ulysses"))
    assert abs(a - b) / a <= 1e-5


def test_sigkill_at_cp2_resumes_bit_exact(wikitext_manifest, tmp_path):
    args = [*BASE, "model.attention=twicing", "parallel.context=2", "training.train_steps=12",
            "checkpoint.interval=6", "model.hidden_dropout=0.1"]  # fmt: skip
    whole = tmp_path / "whole"
    train(whole, wikitext_manifest, 2, *args)
    killed = tmp_path / "killed"
    procs = start(killed, wikitext_manifest, 2, *args,
                  env={"TWICING_FAULT_HOLD_BEFORE_STEP": "8:300"})  # fmt: skip
    wait_for(lambda: "holding before step 8" in output(procs, 0), 300, "step 7", procs)
    signal_all(procs, signal.SIGKILL)
    finish(procs)
    assert (killed / "checkpoints/latest").read_text() == "step_00000006"
    resumed = train(killed, wikitext_manifest, 2, *args)
    assert "resumed from step_00000006: step 6" in resumed[0][1]
    assert losses(killed) == losses(whole)  # every step, bit for bit
    assert not weights_differ(_weights(killed, 12), _weights(whole, 12), HEADS, GROUPS, HIDDEN)


@pytest.mark.parametrize(("source", "ranks", "target"), [
    ("twicing-CP2-allgather", 1, []),
    ("twicing", 4, ["parallel.context=4", "parallel.context_mode=ulysses"]),
], ids=["CP2-to-CP1", "CP1-to-CP4"])  # fmt: skip
def test_a_checkpoint_reshards_to_another_context_size(
    runs, wikitext_manifest, tmp_path, source, ranks, target
):
    """The step-10 checkpoint of one layout, resumed at another through the universal
    conversion: its first loss equals that of the same step at the source's own layout, which
    trained on past its checkpoint (≤ 1e-6)."""
    import shutil

    run_dir = tmp_path / "resumed"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    tag = f"step_{STEPS:08d}"
    shutil.copytree(runs[source] / "checkpoints" / tag, ckpts / tag)
    (ckpts / "latest").write_text(tag)
    args = [*BASE, "model.attention=twicing", f"training.train_steps={STEPS + 1}"]
    out = train(run_dir, wikitext_manifest, ranks, *args, *target, "checkpoint.reshard=true")
    assert f"resumed from {tag}" in out[0][1] and "resharded" in out[0][1]
    got, reference = losses(run_dir), losses(runs[source])
    assert sorted(got) == [STEPS + 1]
    assert abs(got[STEPS + 1] - reference[STEPS + 1]) / reference[STEPS + 1] <= 1e-6
