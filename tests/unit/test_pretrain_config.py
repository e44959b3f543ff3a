"""Training configs: presets validate, bad values name the key, errors come before any
process-group work (a rank that tried to rendezvous alone would hang, so these runs set
WORLD_SIZE=2 but start only rank 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.base.errors import ConfigError
from pretrain.parallel.ds_config import deepspeed_config
from pretrain.train_config import load_config
from pretrain.training.lr_schedule import lr_at

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_validate(preset):
    """Every preset loads, every value it sets survives validation unchanged (none dropped,
    defaulted or coerced to something else), and its parallel layout fits a world of TP × CP × PP
    ranks (DP 1)."""
    import yaml

    cfg = load_config(preset)
    resolved = cfg.to_dict()

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    written = dict(leaves(yaml.safe_load(preset.read_text())))
    assert written, preset
    for key, value in written.items():
        got = resolved
        for part in key.split("."):
            got = got[part]
        if isinstance(value, str) and isinstance(got, float):
            value = float(value)  # PyYAML reads 3e-4 as a string; the config takes it as a float
        assert got == value, f"{preset.name}: {key} = {value!r} resolved to {got!r}"
    world = cfg.parallel.tensor * cfg.parallel.context * cfg.parallel.pipeline
    assert cfg.data_parallel_size(world) == 1


def test_paper_small_presets_match_the_reference_setup():
    base = load_config(ROOT / "configs/wt103_small_softmax.yaml")
    tw = load_config(ROOT / "configs/wt103_small_twicing.yaml")
    m = base.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (
        16,
        128,
        8,
        2048,
    )
    assert (m.activation, m.seq_length, m.hidden_dropout, m.attention) == (
        "relu",
        256,
        0.1,
        "softmax",
    )
    o = base.optimizer
    assert (o.lr, o.grad_clip, o.warmup_steps, o.decay_steps) == (2.5e-4, 0.25, 2000, 500000)
    assert base.training.global_batch_size == 96
    assert tw.model.attention == "twicing" and tw.model.attention_layers == "last:2"
    diff = {k for k, v in tw.to_dict()["model"].items() if base.to_dict()["model"][k] != v}
    assert diff == {"attention", "attention_layers"}


def test_deepspeed_json_is_derived():
    cfg = load_config(ROOT / "configs/demo.yaml", ["parallel.tensor=1", "parallel.zero_stage=2"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 16
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == cfg.optimizer.grad_clip


def test_deepspeed_json_at_pipeline_parallel_leaves_the_micro_batches_to_the_schedule():
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        [
            "parallel.pipeline=2",
            "parallel.tensor=1",
            "training.global_batch_size=16",
            "training.micro_batch_size=2",
        ],  # fmt: skip
    )
    ds = deepspeed_config(cfg, world_size=4)  # DP 2
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 2 * 2
    assert ds["managed_gradient_accumulation"] is False
    assert cfg.grad_accumulation(4) == 4  # micro-batches per step, run by megatron's schedule
    assert "managed_gradient_accumulation" not in deepspeed_config(
        load_config(ROOT / "configs/demo.yaml"), world_size=2
    )


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = load_config(ROOT / "configs/demo.yaml").optimizer
    lrs = [lr_at(s, cfg, 300) for s in range(300)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lrs[cfg.warmup_steps - 1] == pytest.approx(cfg.lr)
    assert all(
        a >= b for a, b in zip(lrs[cfg.warmup_steps :], lrs[cfg.warmup_steps + 1 :], strict=False)
    )
    assert lr_at(300, cfg, 300) == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.num_layer=3"], r"unknown config key 'model\.num_layer'"),
        (["training.train_steps=ten"], r"'training\.train_steps': expected int, got 'ten'"),
        (
            ["model.num_attention_heads=3", "model.hidden_size=96", "parallel.tensor=2"],
            r"3 heads are not divisible by tensor-parallel size 2",
        ),
        (
            ["parallel.zero_stage=0", "parallel.precision=bf16"],
            r"parallel\.precision.*zero_stage 0",
        ),
        (
            ["training.global_batch_size=12", "training.micro_batch_size=8"],
            r"12 is not a multiple of micro_batch_size 8",
        ),
        (["optimizer.lr=-1"], r"'optimizer\.lr': must be > 0, got -1"),
        (
            ["parallel.pipeline=2", "parallel.zero_stage=3"],
            r"'parallel\.zero_stage': ZeRO-3 with pipeline parallelism is refused",
        ),
        (
            ["model.num_layers=3", "parallel.pipeline=2"],
            r"'model\.num_layers': 3 layers are not divisible by pipeline-parallel size 2",
        ),
        (
            ["model.num_layers=4", "parallel.pipeline=4", "parallel.zero_stage=2"],
            r"ZeRO-2 with tied embeddings needs pipeline size <= 2, got 4",
        ),
        (
            ["parallel.context=3"],
            r"'model\.seq_length': 128 is not divisible by 2 × parallel\.context = 6",
        ),
        (
            ["parallel.tensor=1", "parallel.context=8", "parallel.context_mode=ulysses"],
            r"'parallel\.context_mode': ulysses splits each TP rank's 4 query heads and 4",
        ),
        (
            ["parallel.context=2", "parallel.context_mode=ulysses"],  # TP 2: 2 heads per rank
            None,
        ),
        (
            ["parallel.context=2", "parallel.zero_stage=3"],
            r"'parallel\.zero_stage': ZeRO-3 with context parallelism is not supported",
        ),
        (
            ["parallel.context=2", "parallel.offload_optimizer=true"],
            r"'parallel\.offload_optimizer': optimizer offload with context parallelism",
        ),
        (["parallel.context=0"], r"'parallel\.context': must be >= 1, got 0"),
        (["parallel.context_mode=ring"], r"parallel\.context_mode.*ring"),
        (["parallel.pipeline=0"], r"'parallel\.pipeline': must be >= 1, got 0"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    if match is None:  # the valid neighbour of a refused value
        load_config(ROOT / "configs/demo.yaml", overrides)
        return
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/demo.yaml", overrides)


def test_sequence_parallel_with_pipeline_is_accepted():
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true"],
    )
    assert cfg.parallel.sequence_parallel and cfg.parallel.pipeline == 2


def _run_rank0_of_two(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
        "PATH": "/usr/bin:/bin",
        "DS_ACCELERATOR": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.hidden_size=64", "model.num_attention_heads=4", "parallel.tensor=4"],
            r"4 heads|world size 2 is not divisible by tensor-parallel size 4",
        ),
        (
            ["training.global_batch_size=6", "training.micro_batch_size=2", "parallel.tensor=1"],
            r"6 is not divisible by micro_batch_size × DP = 2 × 2 = 4",
        ),
        (["data.manifest=/nonexistent/manifest.json"], r"/nonexistent/manifest\.json"),
        (["parallel.zero_stage=0", "parallel.precision=bf16"], r"zero_stage 0"),
        (["bogus.key=1"], r"unknown config key 'bogus'"),
        (
            [
                "parallel.pipeline=2",
                "parallel.tensor=1",
                "training.global_batch_size=2",
                "training.micro_batch_size=2",
            ],  # fmt: skip
            r"1 micro-batches per step .* are fewer than the 2 pipeline stages",
        ),
        (
            ["parallel.pipeline=4", "parallel.tensor=1", "model.num_layers=4"],
            r"world size 2 is not divisible by tensor-parallel size 1 × pipeline-parallel size 4",
        ),
        (
            ["parallel.context=2", "parallel.tensor=2"],
            r"'parallel\.context': world size 2 is not divisible by tensor-parallel size 2 × "
            r"context-parallel size 2 = 4",
        ),
    ],
)
def test_entry_point_rejects_bad_config_before_process_groups(overrides, match, tmp_path):
    done = _run_rank0_of_two(
        ["--config", str(ROOT / "configs/demo.yaml"), f"run_dir={tmp_path}", *overrides], tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "config error" in done.stderr
    import re

    assert re.search(match, done.stderr), done.stderr[-2000:]
