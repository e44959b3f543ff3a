"""Pipeline parallelism through the real entry point (megatron-core's 1F1B schedule, DeepSpeed
ZeRO-0/1/2, gloo): every layout trains the PP=1 curve and ends at the PP=1 weights; the init is
the same at every layout; checkpoints resume bit-exact, reshard across stages and consolidate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from model.tp_layout import merge

from launch import ROOT, run
from pretrain_runs import finish, losses, metrics, output, signal_all, start, train, wait_for

pytestmark = pytest.mark.slow

STEPS = 10
#: 4 layers (1, 2 or 4 per stage), 4 micro-batches per step at DP 1; dropout 0 (masks differ
#: between layouts, as with TP)
BASE = ["model.num_layers=4", f"training.train_steps={STEPS}"]
VARIANTS = {
    "twicing": [],
    "softmax": ["model.attention=softmax"],
    "softmax-untied": ["model.attention=softmax", "model.tied_embeddings=false"],
    # NeuTRENO with GQA: layer 0's values cross every stage boundary
    "neutreno-full": [
        "model.attention=neutreno", "model.num_query_groups=2", "model.recompute=full"
    ],
    "neutreno-selective": [
        "model.attention=neutreno", "model.num_query_groups=2", "model.recompute=selective"
    ],
}  # fmt: skip
LAYOUTS = {  # name: (ranks, overrides)
    "PP1": (1, []),
    "TP2": (2, ["parallel.tensor=2"]),
    "DP2": (2, []),
    "PP2": (2, ["parallel.pipeline=2"]),
    "PP4": (4, ["parallel.pipeline=4"]),
    "PP2xTP2": (4, ["parallel.pipeline=2", "parallel.tensor=2"]),
    "PP2xDP2": (4, ["parallel.pipeline=2"]),
}
#: (variant, ZeRO stage): the pipeline layouts each is trained at
CASES = {
    ("twicing", 1): ["PP2", "PP4", "PP2xTP2", "PP2xDP2"],
    ("twicing", 0): ["PP2", "PP4", "PP2xTP2", "PP2xDP2"],
    ("softmax", 2): ["PP2", "PP2xDP2"],  # tied embedding: ZeRO-2 at P = 2 only
    ("softmax-untied", 2): ["PP4", "PP2xTP2"],
    ("neutreno-full", 1): ["PP2", "PP4", "PP2xTP2"],
    ("neutreno-selective", 0): ["PP2", "PP2xDP2"],
}
#: the pipeline-free layout with the same TP and DP (final weights are compared against it)
SAME_TP_DP = {"PP2": "PP1", "PP4": "PP1", "PP2xTP2": "TP2", "PP2xDP2": "DP2"}


def _key_bias_slices(name: str, groups: int = 4) -> list[slice]:
    """The key part of a fused QKV bias. Its exact gradient is 0 (softmax ignores a shift of
    all logits), so AdamW turns float noise into ±lr steps there at ANY change of reduction
    order (PP1 vs PP1 at another ZeRO stage included): not comparable between layouts."""
    if not name.endswith("linear_qkv.bias"):
        return []
    heads = 4
    d = 64 // heads  # TINY's 4 heads of hidden 64
    per = (heads // groups + 2) * d
    q = heads // groups * d
    return [slice(g * per + q, g * per + q + d) for g in range(groups)]


def _weights(run_dir):
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint

    return full_state_dict(open_checkpoint(run_dir))


def _train(tmp_path_factory, manifest, variant: str, zero: int, layout: str):
    ranks, overrides = LAYOUTS[layout]
    run_dir = tmp_path_factory.mktemp(f"{variant}-z{zero}-{layout}")
    train(run_dir, manifest, ranks, *BASE, *VARIANTS[variant], f"parallel.zero_stage={zero}",
          *overrides)  # fmt: skip
    return run_dir


@pytest.fixture(scope="module")
def curves(tmp_path_factory, wikitext_manifest):
    """Every case's runs: {(variant, zero): {layout: run_dir}} (references included)."""
    out = {}
    for (variant, zero), layouts in CASES.items():
        refs = {"PP1"} | {SAME_TP_DP[name] for name in layouts}
        out[variant, zero] = {
            name: _train(tmp_path_factory, wikitext_manifest, variant, zero, name)
            for name in [*sorted(refs), *layouts]
        }
    return out


@pytest.mark.parametrize("case", list(CASES), ids=[f"{v}-ZeRO{z}" for v, z in CASES])
def test_every_layout_trains_the_pp1_curve_and_reaches_its_weights(curves, case):
    variant, zero = case
    runs = curves[case]
    reference = losses(runs["PP1"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    groups = 2 if "neutreno" in variant else 4
    for layout in CASES[case]:
        got = losses(runs[layout])
        assert got.keys() == reference.keys(), layout
        worst = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
        assert worst <= 1e-6, f"{layout}: losses differ from PP1 by {worst:.2e} relative"

        ours, theirs = _weights(runs[layout]), _weights(runs[SAME_TP_DP[layout]])
        assert ours.keys() == theirs.keys(), layout
        for name, w in theirs.items():
            a, b = ours[name].clone(), w.clone()
            for s in _key_bias_slices(name, groups):
                a[s] = b[s] = 0
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            assert err <= 1e-5, f"{layout} {name}: final weights differ by {err:.2e} relative"


def test_pipeline_runs_log_their_layout_and_stage_count(curves):
    runs = curves["twicing", 1]
    log = (runs["PP2xTP2"] / "config.yaml").read_text()
    assert "pipeline: 2" in log
    state = json.loads(
        (runs["PP2xTP2"] / "checkpoints/step_00000010/trainer_state.json").read_text()
    )
    assert state["topology"] == {
        "tensor": 2,
        "data": 1,
        "zero_stage": 1,
        "pipeline": 2,
        "context": 1,
    }
    assert state["version"] == 3 and state["origin"] == "train"
    # one model-states file per (stage, TP rank): mp_rank_{stage·TP + tp}
    tag = runs["PP2xTP2"] / "checkpoints/step_00000010"
    assert sorted(f.name for f in tag.glob("mp_rank_*_model_states.pt")) == [
        f"mp_rank_{i:02d}_model_states.pt" for i in range(4)
    ]


INIT_CONFIGS = [
    {"attention": "twicing"},
    {"attention": "neutreno", "num_query_groups": 2, "tied_embeddings": False},
    {"attention": "twicing", "activation": "swiglu", "normalization": "RMSNorm",
     "position_embedding": "learned_absolute", "tied_embeddings": False},
]  # fmt: skip


def _merged_init(tmp_path, tp: int, pp: int) -> list[dict]:
    out = tmp_path / f"init-tp{tp}-pp{pp}"
    out.mkdir()
    cfgs = [
        {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 300,
         "seq_length": 32, **c}
        for c in INIT_CONFIGS
    ]  # fmt: skip
    run(["tests/workers/pp_init.py", str(out), str(tp), str(pp), json.dumps(cfgs)], tp * pp)
    ranks = [torch.load(f, weights_only=False) for f in sorted(out.glob("rank*.pt"))]
    merged = []
    for i, cfg in enumerate(cfgs):
        by_tp: dict[int, dict] = {}  # TP rank -> its weights, every stage's merged
        layout, layers = {}, []
        for r in ranks:
            res = r["results"][i]
            by_tp.setdefault(r["tp_rank"], {}).update(res["weights"])
            layout.update(res["layout"])
            if r["tp_rank"] == 0:
                layers += res["layers"]
        if pp > 1 and cfg.get("tied_embeddings", True):
            for shards in by_tp.values():  # the last stage's copy equals the weight exactly
                assert torch.equal(
                    shards.pop("output_layer.weight"), shards["embedding.word_embeddings.weight"]
                )
        names = by_tp[0].keys()
        weights = {k: merge([by_tp[t][k] for t in range(tp)], layout[k]) for k in names}
        merged.append({"weights": weights, "layers": sorted(layers)})
    return merged


def test_the_initial_model_is_the_same_at_every_layout(tmp_path):
    """Each layer (and the untied output layer) is drawn from its own stream of the seed, so a
    stage that builds only its layers builds them exactly as PP=1 does."""
    one = _merged_init(tmp_path, 1, 1)
    for tp, pp in ((1, 2), (1, 4), (2, 2)):
        other = _merged_init(tmp_path, tp, pp)
        for i, (a, b) in enumerate(zip(one, other, strict=True)):
            assert b["layers"] == [1, 2, 3, 4]  # global layer numbers, each built once
            assert a["weights"].keys() == b["weights"].keys(), (tp, pp, i)
            different = [
                k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])
            ]
            assert not different, (tp, pp, i, different)


def test_sigkill_at_pp2_tp2_resumes_bit_exact(wikitext_manifest, tmp_path):
    args = [*BASE, "training.train_steps=12", "checkpoint.interval=6", "model.hidden_dropout=0.1",
            "parallel.pipeline=2", "parallel.tensor=2", "parallel.zero_stage=1"]  # fmt: skip
    whole = tmp_path / "whole"
    train(whole, wikitext_manifest, 4, *args)

    broken = tmp_path / "killed"
    hold = {"TWICING_FAULT_HOLD_BEFORE_STEP": "8:300"}  # mid-way between two checkpoints
    procs = start(broken, wikitext_manifest, 4, *args, env=hold)
    wait_for(lambda: "holding before step 8" in output(procs, 0), 300, "step 7 done", procs)
    signal_all(procs, signal.SIGKILL)
    finish(procs)
    assert (broken / "checkpoints/latest").read_text() == "step_00000006"
    resumed = train(broken, wikitext_manifest, 4, *args)
    assert "resumed from step_00000006: step 6" in resumed[0][1]
    a, b = losses(whole), losses(broken)
    assert [a[s] for s in range(7, 13)] == [b[s] for s in range(7, 13)]  # bit for bit
    wa, wb = _weights(whole), _weights(broken)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_at_pp2_checkpoints_exits_75_and_resumes_the_same_curve(
    wikitext_manifest, tmp_path
):
    args = [*BASE, "parallel.pipeline=2", "parallel.zero_stage=1"]
    whole = tmp_path / "whole"
    train(whole, wikitext_manifest, 2, *args)
    run_dir = tmp_path / "preempted"
    procs = start(
        run_dir, wikitext_manifest, 2, *args, env={"TWICING_FAULT_HOLD_BEFORE_STEP": "4:300"}
    )
    wait_for(lambda: "holding before step 4" in output(procs, 0), 300, "3 steps", procs)
    signal_all(procs, signal.SIGTERM)
    assert finish(procs) == [75, 75], [output(procs, r)[-2000:] for r in range(2)]
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000004"
    resumed = train(run_dir, wikitext_manifest, 2, *args)
    assert "resumed from step_00000004: step 4" in resumed[0][1]
    assert losses(run_dir) == losses(whole)


@pytest.mark.parametrize("zero", [0, 1])
def test_a_nonfinite_loss_on_the_last_stage_is_skipped_or_halts_every_stage(
    wikitext_manifest, tmp_path, zero
):
    args = [*BASE, "training.train_steps=5", "checkpoint.interval=2", "parallel.pipeline=2",
            f"parallel.zero_stage={zero}"]  # fmt: skip
    nan = {"TWICING_FAULT_NAN_AT_STEP": "2"}  # the 3rd step, on rank 1 (the last stage)
    skip = tmp_path / "skip"
    train(skip, wikitext_manifest, 2, *args, "training.nonfinite=skip", env=nan)
    rows = {m["step"]: m for m in metrics(skip) if "loss" in m}
    assert rows[3]["skipped"] and not any(rows[s]["skipped"] for s in (1, 2, 4, 5))
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (4, 5))
    state = json.loads((skip / "checkpoints/step_00000005/trainer_state.json").read_text())
    assert state["skipped_steps"] == 1

    halt = tmp_path / "halt"
    results = train(halt, wikitext_manifest, 2, *args, "training.nonfinite=halt", env=nan,
                    check=False)  # fmt: skip
    assert [rc for rc, _ in results] == [3, 3], results[1][1][-2000:]
    assert "non-finite" in results[0][1]
    assert (halt / "checkpoints/latest").read_text() == "step_00000002"


@pytest.fixture(scope="module")
def pp2_tp2_source(tmp_path_factory, wikitext_manifest):
    """A PP2×TP2 ZeRO-1 run with a checkpoint at step 5, and its twin without pipeline (TP2:
    final weights are compared at the same TP, whose own numerics move some norm biases ~5e-5
    from TP1 over 10 Adam steps)."""
    base = tmp_path_factory.mktemp("reshard")
    args = [*BASE, "checkpoint.interval=5", "parallel.zero_stage=1", "training.eval_interval=5",
            "training.eval_steps=2"]  # fmt: skip
    source = base / "source"
    train(source, wikitext_manifest, 4, *args, "parallel.pipeline=2", "parallel.tensor=2")
    twin = base / "pp1"
    train(twin, wikitext_manifest, 2, *args, "parallel.tensor=2")
    return base, source, twin, args


@pytest.mark.parametrize(
    "layout", ["PP1", "PP4", "PP2xDP2"], ids=["to-PP1", "to-PP4", "to-PP2xDP2"]
)
def test_a_pp2_tp2_checkpoint_resumes_resharded_at_another_layout(
    pp2_tp2_source, wikitext_manifest, layout
):
    import shutil

    base, source, _, args = pp2_tp2_source
    dst = base / f"resumed-{layout}"
    shutil.copytree(source / "checkpoints/step_00000005", dst / "checkpoints/step_00000005")
    (dst / "checkpoints/latest").write_text("step_00000005")
    ranks, overrides = LAYOUTS[layout]
    results = train(dst, wikitext_manifest, ranks, *args, *overrides, "checkpoint.reshard=true")
    assert "resumed from step_00000005: step 5" in results[0][1]
    assert "(resharded TP2×DP1×PP2 ZeRO-1 ->" in results[0][1]
    a, b = losses(source), losses(dst)
    assert sorted(b) == list(range(6, STEPS + 1))
    assert abs(b[6] - a[6]) / a[6] <= 1e-6, (b[6], a[6])


@pytest.fixture(scope="module")
def consolidated(pp2_tp2_source):
    """``pretrain.consolidate`` of the PP2×TP2 run's final checkpoint."""
    base, source, _, _ = pp2_tp2_source
    out = base / "consolidated" / "pp2tp2.pt"
    out.parent.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pretrain.consolidate", "--checkpoint", str(source), "--out",
         str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return out


def test_validation_at_pp2_equals_pp1_and_consolidated_stages_are_the_pp1_model(
    pp2_tp2_source, consolidated
):
    base, source, twin, _ = pp2_tp2_source
    valid = {r["step"]: r["valid_loss"] for r in metrics(source) if "valid_loss" in r}
    valid_pp1 = {r["step"]: r["valid_loss"] for r in metrics(twin) if "valid_loss" in r}
    assert sorted(valid) == [5, 10] and valid.keys() == valid_pp1.keys()
    for s in valid:
        assert abs(valid[s] - valid_pp1[s]) / valid_pp1[s] <= 1e-6, (s, valid[s], valid_pp1[s])

    from pretrain.checkpoint.reader import open_checkpoint

    merged = open_checkpoint(consolidated).weights
    assert merged is not None and "output_layer.weight" not in merged  # the tied copy is dropped
    direct = _weights(source)
    assert merged.keys() == direct.keys() and all(torch.equal(merged[k], direct[k]) for k in merged)
    pp1 = _weights(twin)
    assert merged.keys() == pp1.keys()
    for name, w in pp1.items():
        a, b = merged[name].clone(), w.clone()
        for s in _key_bias_slices(name):
            a[s] = b[s] = 0
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= 1e-5, name


def test_evaluate_and_export_read_a_pp2_checkpoint_as_its_consolidated_weights(
    pp2_tp2_source, consolidated, tmp_path
):
    base, source, _, _ = pp2_tp2_source
    out = consolidated
    ppl = []
    for target in (source, out):
        report = tmp_path / f"{target.name}.json"
        run(
            ["-m", "pretrain.evaluate", "--checkpoint", str(target), "--data", "wikitext-2:valid",
             "--max-documents", "2", "--no-oversmoothing", "--no-progress", "--out", str(report)],
            1, timeout=300,
        )  # fmt: skip
        ppl.append(json.loads(report.read_text())["token_ppl"])
    assert ppl[0] == ppl[1]

    samples = []
    for target in (source, out):
        jsonl = tmp_path / f"{target.name}.jsonl"
        run(["-m", "pretrain.generate", "--checkpoint", str(target), "--prompt", "The game was",
             "--max-new-tokens", "12", "--temperature", "0", "--out", str(jsonl)], 1,
            timeout=300)  # fmt: skip
        samples.append([json.loads(line) for line in jsonl.read_text().splitlines()])
    (a,), (b,) = samples
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12
    assert a["completion"] == b["completion"]

    exports = []
    for target in (source, out):
        hf = tmp_path / f"hf-{target.name}"
        run(["-m", "pretrain.export_hf", "--checkpoint", str(target), "--out", str(hf)], 1,
            timeout=300)  # fmt: skip
        exports.append(hf)
    a, b = (sorted(p.glob("*.safetensors")) for p in exports)
    assert a and [f.name for f in a] == [f.name for f in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
