"""Training on real WikiText-2: loss falls, TP2×DP2 ≡ TP1×DP1 for every ZeRO stage, TensorBoard."""

from __future__ import annotations

import pytest

from pretrain_runs import losses, metrics, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attention", ["softmax", "twicing"])
def test_loss_falls_on_wikitext2(wikitext_manifest, tmp_path, attention):
    run_dir = tmp_path / attention
    train(
        run_dir,
        wikitext_manifest,
        1,
        f"model.attention={attention}",
        "training.train_steps=40",
        "training.eval_interval=20",
        "training.eval_steps=4",
    )
    curve = losses(run_dir)
    first, last5 = curve[1], sum(curve[s] for s in range(36, 41)) / 5
    assert first > 6.5  # ~ln(1024) at init
    assert last5 < first - 1.0, (first, last5)
    valid = [m["valid_loss"] for m in metrics(run_dir) if "valid_loss" in m]
    assert len(valid) == 2 and valid[1] < valid[0]


STEPS = 20


@pytest.fixture(scope="module")
def reference_curve(wikitext_manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "tp1dp1"
    train(run_dir, wikitext_manifest, 1, f"training.train_steps={STEPS}", "parallel.zero_stage=0")
    return losses(run_dir)


@pytest.mark.parametrize(
    "stage,extra",
    [(0, []), (1, []), (2, []), (3, []), (1, ["parallel.sequence_parallel=true"])],
    ids=["zero0", "zero1", "zero2", "zero3", "zero1-seqpar"],
)
def test_tp2_dp2_matches_tp1_dp1(wikitext_manifest, tmp_path, reference_curve, stage, extra):
    run_dir = tmp_path / "tp2dp2"
    train(
        run_dir,
        wikitext_manifest,
        4,
        f"training.train_steps={STEPS}",
        "parallel.tensor=2",
        f"parallel.zero_stage={stage}",
        *extra,
    )
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    worst = max(abs(curve[s] - reference_curve[s]) for s in curve)
    assert worst <= 1e-5, f"max |Δloss| over {STEPS} steps = {worst:.2e}"
    assert reference_curve[STEPS] < reference_curve[1] - 0.5  # it actually trained


def test_tensorboard_event_files_hold_the_scalars(wikitext_manifest, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    train(
        run_dir,
        wikitext_manifest,
        2,
        "training.train_steps=6",
        "training.eval_interval=3",
        "training.eval_steps=2",
        "parallel.zero_stage=1",
    )
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/tflops_per_rank",
        "train/memory_gib",
        "train/skipped_steps",
        "valid/loss",
        "valid/ppl",
    }
    assert expected <= tags, expected - tags
    loss_events = {e.step: e.value for e in events.Scalars("train/loss")}
    curve = losses(run_dir)
    assert sorted(loss_events) == list(range(1, 7))
    for step, value in loss_events.items():
        assert value == pytest.approx(curve[step], rel=1e-6)
    assert [e.step for e in events.Scalars("valid/ppl")] == [3, 6]
