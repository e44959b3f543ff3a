"""Resume at another TP × DP layout through DeepSpeed universal checkpoints.

A TP2×DP2 run (ZeRO-1 with the tiny twicing GPT; ZeRO-2 with a SwiGLU/RMSNorm/GQA/untied softmax
GPT, whose ``linear_fc1`` is split with stride 2) saves at step 3 and runs on to step 6. Its step-3
checkpoint alone is resumed at TP1×DP1, TP2×DP1 and TP1×DP2 with ``checkpoint.reshard=true``: the
first resumed step must reproduce the original loss (≤ 1e-5), the LR schedule and data position
carry over, and the next steps and final weights follow the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain_runs import losses, metrics, train

pytestmark = pytest.mark.slow

RUN = ["training.train_steps=6", "checkpoint.interval=3", "checkpoint.keep_last=4"]
#: ZeRO-2 runs this model: stride-2 SwiGLU fc1, grouped-query QKV, separate output layer
SWIGLU = [
    "model.attention=softmax",
    "model.normalization=RMSNorm",
    "model.activation=swiglu",
    "model.add_bias_linear=false",
    "model.num_query_groups=2",
    "model.tied_embeddings=false",
]
MODEL = {1: [], 2: SWIGLU, 3: SWIGLU}
TARGETS = {"TP1xDP1": (1, 1), "TP2xDP1": (2, 2), "TP1xDP2": (2, 1)}  # name: (ranks, tensor)


def _original(
    manifest: Path, root: Path, stage: int, ranks: int = 4, tensor: int = 2, *extra: str
) -> Path:
    run_dir = root / f"original-zero{stage}"
    train(
        run_dir,
        manifest,
        ranks,
        *RUN,
        *MODEL[stage],
        f"parallel.tensor={tensor}",
        f"parallel.zero_stage={stage}",
        *extra,
    )
    return run_dir


@pytest.fixture(scope="module", params=["sync", "async"])
def originals(wikitext_manifest, tmp_path_factory, request):
    """Uninterrupted TP2×DP2 runs, ZeRO-1 and ZeRO-2 (checkpoints at steps 3 and 6), saved
    synchronously and in the background (``checkpoint.async_save``): resharding reads both."""
    root = tmp_path_factory.mktemp(f"reshard-{request.param}")
    mode = f"checkpoint.async_save={'true' if request.param == 'async' else 'false'}"
    return {stage: _original(wikitext_manifest, root, stage, 4, 2, mode) for stage in (1, 2)}


def from_step3(original: Path, run_dir: Path) -> Path:
    """A run dir holding only the original's step-3 checkpoint (as a preempted job leaves it)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(original / "checkpoints/step_00000003", root / "step_00000003")
    (root / "latest").write_text("step_00000003")
    return run_dir


def full_weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint

    return full_state_dict(open_checkpoint(run_dir, tag))


def assert_follows(original: Path, resumed: Path, tolerance: float = 1e-5) -> dict[int, float]:
    """Steps 4–6 of ``resumed`` vs ``original``: losses and LRs, then the final weights."""
    a, b = losses(original), losses(resumed)
    assert sorted(b) == [4, 5, 6]  # resumed after step 3, nothing re-run or skipped
    diffs = {s: abs(a[s] - b[s]) for s in b}
    assert diffs[4] <= 1e-5, diffs  # the first resumed step: the original's loss
    assert max(diffs.values()) <= tolerance, diffs
    lr_a = {m["step"]: m["lr"] for m in metrics(original) if "lr" in m}
    lr_b = {m["step"]: m["lr"] for m in metrics(resumed) if "lr" in m}
    assert all(lr_a[s] == lr_b[s] for s in lr_b)
    wa, wb = full_weights(original, "step_00000006"), full_weights(resumed, "step_00000006")
    assert wa.keys() == wb.keys()
    drift = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert drift <= 1e-5, drift
    return diffs


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_tp2xdp2_at_another_layout(originals, wikitext_manifest, tmp_path, stage, target):
    ranks, tensor = TARGETS[target]
    original = originals[stage]
    run_dir = from_step3(original, tmp_path / "resumed")
    args = [*RUN, *MODEL[stage], f"parallel.tensor={tensor}", f"parallel.zero_stage={stage}"]
    if target == "TP1xDP1" and stage == 1:
        # without the flag a different layout is refused, naming the flag, before any load
        refused = train(run_dir, wikitext_manifest, ranks, *args, check=False)
        assert [rc for rc, _ in refused] == [4] * ranks
        assert "checkpoint.reshard=true" in refused[0][1]
        assert "TP2×DP2 ZeRO-1" in refused[0][1] and "TP1×DP1 ZeRO-1" in refused[0][1]
        assert not (run_dir / "checkpoints/universal").exists()

    out = train(run_dir, wikitext_manifest, ranks, *args, "checkpoint.reshard=true")[0][1]
    dp = ranks // tensor
    assert (
        f"resumed from step_00000003: step 3, 24 samples (resharded TP2×DP2 ZeRO-{stage} -> "
        f"TP{tensor}×DP{dp} ZeRO-{stage})" in out
    )
    diffs = assert_follows(original, run_dir)
    print(f"ZeRO-{stage} TP2xDP2 -> {target}: |Δloss| per step {diffs}")
    saved = json.loads((run_dir / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert saved["topology"] == {"tensor": tensor, "data": dp, "zero_stage": stage, "pipeline": 1,
                                "context": 1}  # fmt: skip
    assert saved["consumed_samples"] == 48
    # the conversion is pruned once a checkpoint at the new layout exists
    assert not (run_dir / "checkpoints/universal/step_00000003").exists()


def test_zero_stage_change_and_zero3_at_tp1(originals, wikitext_manifest, tmp_path):
    """ZeRO-2 → ZeRO-1 at TP1×DP2 follows the run; a TP2×DP1 ZeRO-3 checkpoint resumes at
    TP1×DP2 ZeRO-3 (DeepSpeed's ZeRO-3 universal load repaired: per-group hyperparameters and
    Adam steps) and follows its own uninterrupted run."""
    run_dir = from_step3(originals[2], tmp_path / "zero2to1")
    args = [*RUN, *SWIGLU, "parallel.tensor=1", "parallel.zero_stage=1", "checkpoint.reshard=true"]
    train(run_dir, wikitext_manifest, 2, *args)
    print("ZeRO-2 TP2xDP2 -> ZeRO-1 TP1xDP2:", assert_follows(originals[2], run_dir))

    zero3 = _original(wikitext_manifest, tmp_path, 3, ranks=2, tensor=2)
    run_dir = from_step3(zero3, tmp_path / "zero3")
    args = [*RUN, *SWIGLU, "parallel.tensor=1", "parallel.zero_stage=3", "checkpoint.reshard=true"]
    out = train(run_dir, wikitext_manifest, 2, *args)[0][1]
    assert "(resharded TP2×DP1 ZeRO-3 -> TP1×DP2 ZeRO-3)" in out
    print("ZeRO-3 TP2xDP1 -> TP1xDP2:", assert_follows(zero3, run_dir))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["parallel.tensor=2", "parallel.zero_stage=3"],
            "ZeRO-3 only at tensor parallel 1",
        ),
        (["parallel.tensor=1", "parallel.zero_stage=0"], "cannot be loaded into ZeRO-0"),
    ],
)
def test_unsupported_layouts_are_refused_naming_the_supported_path(
    originals, wikitext_manifest, tmp_path, overrides, expected
):
    run_dir = from_step3(originals[1], tmp_path / "refused")
    results = train(
        run_dir, wikitext_manifest, 2, *RUN, *overrides, "checkpoint.reshard=true", check=False
    )
    assert [rc for rc, _ in results] == [4, 4], results[0][1][-2000:]
    assert expected in results[0][1] and "Supported: resume with" in results[0][1]
    assert "resumed from" not in results[0][1]
    assert not (run_dir / "checkpoints/universal").exists()  # refused before any conversion
    assert not (run_dir / "checkpoints/step_00000006").exists()


def test_universal_conversion_holds_the_tp1_weights(originals):
    """The converter's fp32 tensors are the TP=1 merge of the shards (stride-2 SwiGLU and
    grouped QKV included), its Adam moments have the full shapes, and a second conversion of
    the same checkpoint is reused, not redone."""
    from pretrain.checkpoint.reader import full_state_dict, open_checkpoint
    from pretrain.checkpoint.reshard import SOURCE, convert
    from pretrain.universal import main

    ck = open_checkpoint(originals[2], "step_00000003")
    assert main([str(originals[2]), "--tag", "step_00000003"]) == 0  # the offline command
    out = originals[2] / "checkpoints/universal/step_00000003"
    assert (out / "COMPLETE").is_file() and not list(out.parent.glob(".tmp-*"))
    full = full_state_dict(ck)
    assert any(ck.layout[k].stride == 2 for k in full)
    for name, weight in full.items():
        fp32 = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(fp32.view(weight.shape), weight), name
        for moment in ("exp_avg", "exp_avg_sq"):
            state = torch.load(out / "zero" / name / f"{moment}.pt", weights_only=False)["param"]
            assert state.numel() == weight.numel() and state.abs().sum() > 0, (name, moment)
    mtime = (out / SOURCE).stat().st_mtime_ns
    assert convert(ck.tag_dir) == out and (out / SOURCE).stat().st_mtime_ns == mtime
    shutil.rmtree(out.parent)
