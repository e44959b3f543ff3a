"""A GPT at TP=2 (two gloo processes) equals TP=1 from the same master weights."""

from __future__ import annotations

import json

import pytest
import torch

from launch import run

CONFIGS = [
    {"attention": "twicing"},
    {"attention": "softmax"},
    # GQA + SwiGLU (strided fc1 split) + RMSNorm + twicing only in the last layer
    {
        "attention": "twicing",
        "attention_layers": "last:1",
        "num_query_groups": 2,
        "activation": "swiglu",
        "normalization": "RMSNorm",
    },
    {"attention": "twicing", "position_embedding": "learned_absolute", "tied_embeddings": False},
    {"attention": "neutreno", "num_query_groups": 2},
    {"attention": "resformer"},
    {"attention": "svformer", "num_query_groups": 2, "recompute": "full"},
    {"attention": "neural", "attention_layers": [0], "attention_options": {"dim": 4}},
]
BASE = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "vocab_size": 300,
    "seq_length": 32,
}


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    cfgs = json.dumps([{**BASE, **c} for c in CONFIGS])
    out = {}
    for tp in (1, 2):
        run(["tests/workers/tp_grads.py", str(tmp / f"tp{tp}.pt"), cfgs], tp, timeout=300)
        out[tp] = torch.load(tmp / f"tp{tp}.pt", weights_only=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[str(c) for c in CONFIGS])
def test_tp2_equals_tp1(tp_results, index):
    one, two = tp_results[1][index], tp_results[2][index]
    assert one["variants"] == two["variants"]
    # same master weights on both sides, same loss and gradients
    for name, w in one["weights"].items():
        assert torch.equal(w, two["weights"][name]), name
    rel = abs(one["loss"] - two["loss"]) / abs(one["loss"])
    assert rel <= 1e-6, (one["loss"], two["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        err = (two["grads"][name] - g).norm() / g.norm().clamp_min(1e-30)
        assert err <= 1e-6, f"{name}: relative gradient error {err:.2e}"
