"""Perplexity evaluation: protocols vs an independent cross-entropy loop, word-level
normalisation, TP=2 ≡ TP=1, ZeRO-3 checkpoints, over-smoothing metric, swaps, PNG, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from launch import run
from pretrain_runs import train

EVAL = [
    "-m",
    "pretrain.evaluate",
    "--data",
    "wikitext-2:valid",
    "--max-documents",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tp2_run(wikitext_manifest, tmp_path_factory):
    """A tiny twicing GPT trained at TP=2 × DP=1 with ZeRO-1 (checkpoint at step 6)."""
    run_dir = tmp_path_factory.mktemp("evalrun") / "tp2"
    train(
        run_dir,
        wikitext_manifest,
        2,
        "parallel.tensor=2",
        "training.train_steps=6",
        "checkpoint.interval=6",
        "parallel.zero_stage=1",
    )
    return run_dir


@pytest.fixture(scope="module")
def eval_model(tp2_run, one_rank):
    from pretrain.checkpoint.load_model import load_model
    from pretrain.checkpoint.reader import open_checkpoint

    ck = open_checkpoint(tp2_run)
    return ck, load_model(ck, rank=0, tp=1)


def reference_nll(model, stream: list[int], length: int, stride: int) -> tuple[float, int]:
    """Independent: HF-guide sliding window over the model's logits, one window at a time."""
    tokens = torch.tensor(stream)
    n, total, count, prev_end, begin = len(tokens), 0.0, 0, 0, 0
    while prev_end < n - 1:
        end = min(begin + length, n - 1)
        new = end - prev_end  # targets begin+1..end+1 of which the last `new` are unscored
        x = tokens[begin:end].unsqueeze(0)
        pos = torch.arange(end - begin).unsqueeze(0)
        with torch.no_grad():
            logits = model(x, pos, None)  # [1, s, V] at TP=1
        logp = F.log_softmax(logits[0].double(), dim=-1)
        targets = tokens[begin + 1 : end + 1]
        nll = -logp[torch.arange(end - begin), targets]
        total += float(nll[-new:].sum())
        count += new
        prev_end = end
        begin += stride
    return total, count


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["segments", "sliding"])
def test_perplexity_matches_an_independent_cross_entropy_loop(eval_model, protocol):
    from pretrain.evaluation.perplexity import score
    from pretrain.evaluation.scorer import token_nll
    from pretrain.evaluation.texts import load_text

    ck, model = eval_model
    text = load_text("wikitext-2:valid", max_documents=2)
    stream = text.token_stream(ck.tokenizer)[:700]
    length = ck.model.seq_length
    stride = length if protocol == "segments" else 24
    ours = score(stream, token_nll(model), length=length, stride=stride, batch_size=3)
    ref, count = reference_nll(model, stream, length, stride)
    assert ours.targets == count == len(stream) - 1
    assert abs(ours.nll - ref) / ref <= 1e-6
    if protocol == "sliding":
        seg = score(stream, token_nll(model), length=length, stride=length, batch_size=4)
        same = score(stream, token_nll(model), length=length, stride=length, batch_size=1)
        assert seg.nll == pytest.approx(same.nll, rel=1e-12)
        assert seg.nll > ours.nll  # more context per target lowers the loss


@pytest.mark.slow
def test_word_level_normalisation_on_a_hand_checked_text(eval_model):
    from pretrain.evaluation.driver import evaluate_text
    from pretrain.evaluation.texts import EvalText

    ck, model = eval_model
    # 3 + 2 + 4 = 9 whitespace words ("--" and "café." count as words); bytes: é is 2 in UTF-8
    docs = [" The cat sat \n", "  a  -- \n", " café. on the mat \n"]
    text = EvalText("hand", docs)
    assert (text.words, text.lines, text.bytes) == (9, 3, 14 + 9 + 20)
    r = evaluate_text(model, ck.tokenizer, text, length=64, stride=64, batch_size=2)
    assert r["words"] == 9
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll_sum"] / 9), rel=1e-12)
    assert r["token_ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["nll_sum"] / math.log(2) / 43, rel=1e-12)
    assert r["tokens"] == len(text.token_stream(ck.tokenizer)) - 1


@pytest.mark.slow
def test_tp2_checkpoint_evaluated_at_tp2_and_tp1_agree(tp2_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out1, out2 = tmp_path / "tp1.json", tmp_path / "tp2.json"
    common = [*EVAL, "--checkpoint", str(tp2_run), "--swap-rates", "0.1", "--swap-seed", "3"]
    common += ["--attention-entropy", "--skip-positions", "1"]
    run([*common, "--out", str(out1)], 1, timeout=300)
    run([*common, "--out", str(out2), "--no-oversmoothing"], 2, timeout=300)
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert (a["tensor_parallel"], b["tensor_parallel"]) == (1, 2)
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert ra["tokens"] == rb["tokens"] and ra["swap_rate"] == rb["swap_rate"]
        assert abs(ra["token_ppl"] - rb["token_ppl"]) / ra["token_ppl"] <= 1e-6
    ea, eb = a["attention_entropy"], b["attention_entropy"]  # TP=2: each rank holds 2 heads
    assert len(ea["entropy"]) == 2 and ea["skip_positions"] == 1
    for key in ("entropy", "normalized"):
        assert eb[key] == pytest.approx(ea[key], rel=1e-6)
    assert all(0 < v < 1 for v in ea["normalized"])
    clean, swapped = a["results"]
    assert swapped["token_ppl"] > clean["token_ppl"] and swapped["swapped_words"] > 0
    swaps = (tmp_path / "tp1.swaps-p0.1.jsonl").read_text().splitlines()
    assert len(swaps) == swapped["swapped_words"]
    curve = a["oversmoothing"]["layers"]
    assert len(curve) == 3 and all(-1 <= v <= 1 for v in curve)
    png = tmp_path / "tp1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    events = EventAccumulator(str(tp2_run / "tensorboard" / "eval"))
    events.Reload()
    assert {
        "eval/token_ppl",
        "eval/word_ppl",
        "eval/token_ppl_swap0.1",
        "eval/attention_entropy/layer_01",
    } <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_zero3_checkpoint_evaluates_like_the_same_run_under_zero1(
    wikitext_manifest, tp2_run, tmp_path
):
    run_dir = tmp_path / "z3"
    train(
        run_dir,
        wikitext_manifest,
        2,
        "parallel.tensor=2",
        "training.train_steps=6",
        "checkpoint.interval=6",
        "parallel.zero_stage=3",
    )
    outs = {}
    for name, rd in (("z1", tp2_run), ("z3", run_dir)):
        outs[name] = tmp_path / f"{name}.json"
        run(
            [*EVAL, "--checkpoint", str(rd), "--no-oversmoothing", "--out", str(outs[name])],
            1,
            timeout=300,
        )
    z1, z3 = (json.loads(p.read_text())["token_ppl"] for p in outs.values())
    assert abs(z1 - z3) / z1 <= 1e-5


@pytest.mark.slow
def test_clear_errors(tp2_run, tmp_path):
    def fails(args, code):
        results = run([*EVAL, *args], 1, timeout=120, check=False)
        rc, out = results[0]
        assert rc == code, out[-2000:]
        return out

    out = fails(["--checkpoint", str(tmp_path / "nowhere")], 4)
    assert "nowhere" in out and "does not exist" in out

    broken = tmp_path / "broken"
    shutil.copytree(tp2_run / "checkpoints", broken)
    (broken / "step_00000006" / "COMPLETE").unlink()
    out = fails(["--checkpoint", str(broken / "step_00000006")], 4)
    assert "incomplete" in out

    other = tmp_path / "other.model"
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g"] * 50),
        model_prefix=str(other)[:-6],
        vocab_size=12,
        minloglevel=2,
    )
    out = fails(["--checkpoint", str(tp2_run), "--tokenizer", str(other)], 4)
    assert "does not match" in out and "other.model" in out

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n{"text": "\\n"}\n')
    results = run(
        [*EVAL[:2], "--checkpoint", str(tp2_run), "--data", f"blank={empty}"], 1, check=False
    )
    assert results[0][0] == 2 and "empty" in results[0][1], results[0][1][-1500:]

    out = fails(["--hf-model", str(tmp_path / "hf"), "--attention-entropy"], 2)
    assert "--attention-entropy" in out and "--hf-model" in out
