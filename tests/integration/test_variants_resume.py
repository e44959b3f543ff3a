"""A NeuTRENO run at TP=2 resumes bit-exactly (multi-process, DeepSpeed)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_neutreno_tp2_run_resumes_bit_exactly(wikitext_manifest, tmp_path):
    from pretrain_runs import losses, train

    args = [
        "model.attention=neutreno",
        "model.num_query_groups=2",
        "parallel.tensor=2",
        "training.train_steps=6",
        "checkpoint.interval=3",
        "model.hidden_dropout=0.1",
        "model.recompute=full",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, wikitext_manifest, 2, *args)
    first = train(split, wikitext_manifest, 2, *args, "training.exit_at_step=3", check=False)
    assert [rc for rc, _ in first] == [75, 75]
    resumed = train(split, wikitext_manifest, 2, *args)
    assert "resumed from step_00000003" in resumed[0][1]
    assert losses(whole) == losses(split)
    assert (
        json.loads((split / "checkpoints/step_00000006/trainer_state.json").read_text())["step"]
        == 6
    )
