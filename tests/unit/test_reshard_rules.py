"""Resharding rules without a run: universal-checkpoint patterns, and which layouts can resume
where."""

from __future__ import annotations

import pytest


def test_universal_info_patterns():
    import re

    from data_prep.base.errors import CheckpointError
    from pretrain.checkpoint.reshard import AVERAGE, ROW_PARALLEL, TWO_SUB_PARAMS, universal_info

    layout = {
        "embedding.word_embeddings.weight": {"dim": 0, "stride": 1},
        "decoder.layers.0.input_layernorm.weight": {"dim": None, "stride": 1},
        "decoder.layers.11.input_layernorm.weight": {"dim": None, "stride": 1},
        "decoder.layers.0.self_attention.linear_qkv.weight": {"dim": 0, "stride": 1},
        "decoder.layers.0.self_attention.linear_proj.weight": {"dim": 1, "stride": 1},
        "decoder.layers.0.self_attention.linear_proj.bias": {"dim": None, "stride": 1},
        "decoder.layers.3.mlp.linear_fc1.weight": {"dim": 0, "stride": 2},
        "decoder.layers.3.mlp.linear_fc2.weight": {"dim": 1, "stride": 1},
        "decoder.final_layernorm.weight": {"dim": None, "stride": 1},
    }
    info = universal_info(layout)

    def category(name):
        found = [
            k
            for k in (AVERAGE, ROW_PARALLEL, TWO_SUB_PARAMS)
            if any(re.match(p, name) for p in info[k])
        ]
        assert len(found) <= 1, (name, found)
        return found[0] if found else None

    assert category("decoder.layers.7.input_layernorm.weight") == AVERAGE  # any layer index
    assert category("decoder.layers.0.self_attention.linear_proj.bias") == AVERAGE
    assert category("decoder.layers.0.self_attention.linear_proj.weight") == ROW_PARALLEL
    assert category("decoder.layers.5.mlp.linear_fc2.weight") == ROW_PARALLEL
    assert category("decoder.layers.5.mlp.linear_fc1.weight") == TWO_SUB_PARAMS
    assert category("decoder.layers.0.self_attention.linear_qkv.weight") is None  # cat dim 0
    assert category("embedding.word_embeddings.weight") is None
    assert category("decoder.layers.0.mlp.linear_fc1.weight_x") is None  # anchored
    assert len(info[AVERAGE]) == 3  # layer indices generalised: one pattern per kind
    with pytest.raises(CheckpointError, match="no universal-checkpoint merge rule"):
        universal_info({"x.weight": {"dim": 1, "stride": 2}})


@pytest.mark.parametrize(
    ("saved", "here", "expected"),
    [
        ((2, 2, 1), (1, 1, 1), True),
        ((2, 2, 2), (2, 1, 1), True),
        ((1, 4, 3), (1, 2, 3), True),
        ((2, 2, 3), (1, 1, 3), True),
        ((2, 2, 0), (2, 1, 0), False),  # ZeRO-0 model states do not depend on DP
        ((2, 2, 1), (2, 2, 3), "ZeRO-3 only at tensor parallel 1"),
        ((1, 2, 3), (1, 2, 1), "differs between ZeRO-3 and ZeRO-1/2"),
        ((1, 2, 1), (1, 2, 3), "differs between ZeRO-3 and ZeRO-1/2"),
        ((2, 2, 0), (1, 2, 0), "parallel.tensor=2 at any data-parallel size"),
        ((2, 2, 1), (2, 2, 0), "cannot be loaded into ZeRO-0"),
        ((2, 1, 1, 2), (1, 1, 1, 4), True),  # across pipeline sizes through universal
        ((2, 1, 2, 2), (1, 2, 1, 1), True),
        ((1, 2, 0, 2), (1, 4, 0, 2), False),  # ZeRO-0 stages at another DP: as is
        ((1, 2, 0, 2), (1, 2, 0, 1), "parallel.tensor=1 and parallel.pipeline=2 at any"),
    ],
)
def test_supported_layouts(saved, here, expected):
    from data_prep.base.errors import CheckpointError
    from pretrain.checkpoint.resume import check_supported
    from pretrain.checkpoint.state import Topology

    def topo(t):
        return Topology(tensor=t[0], data=t[1], zero_stage=t[2], pipeline=(t + (1,))[3])

    if isinstance(expected, bool):
        assert check_supported(topo(saved), topo(here)) is expected
    else:
        with pytest.raises(CheckpointError, match="Supported: ") as e:
            check_supported(topo(saved), topo(here))
        assert expected in str(e.value)


def test_a_tied_embedding_across_stages_is_skipped_by_the_converter():
    import re

    from pretrain.checkpoint.reshard import PIPELINE_REPLICATED, universal_info

    layout = {"output_layer.weight": {"dim": 0, "stride": 1}}
    assert universal_info(layout)[PIPELINE_REPLICATED] == []
    (pattern,) = universal_info(layout, tied_copy=True)[PIPELINE_REPLICATED]
    assert re.match(pattern, "output_layer.weight")
    assert not re.match(pattern, "output_layer.weight_x")
    assert not re.match(pattern, "embedding.word_embeddings.weight")


def test_trainer_state_reads_pipeline_and_old_files_without_it(tmp_path):
    from pretrain.checkpoint.state import TrainerState

    data = {
        "step": 3, "consumed_samples": 24, "config": {"model": {}}, "tp_layout": {},
        "topology": {"tensor": 2, "data": 1, "zero_stage": 1},
        "tokenizer": {"file": "tokenizer.model", "sha256": "ab", "vocab_size": 8, "eod": 0},
    }  # fmt: skip
    old = TrainerState.from_json({**data, "version": 1}, "old.json")
    assert old.topology.pipeline == 1 and old.topology.describe() == "TP2×DP1 ZeRO-1"
    data["topology"]["pipeline"] = 2
    new = TrainerState.from_json({**data, "version": 2}, "new.json")
    assert new.topology.pipeline == 2 and new.topology.describe() == "TP2×DP1×PP2 ZeRO-1"
    assert TrainerState.from_json(new.to_json(), "x") == new
    data["topology"]["pipeline"] = "two"
    with pytest.raises(Exception, match=r"new\.json.*pipeline"):
        TrainerState.from_json({**data, "version": 2}, "new.json")
