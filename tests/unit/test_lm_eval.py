"""lm-evaluation-harness: our ``twicing`` model on a checkpoint and lm-eval's own ``hf`` model on
its Hugging Face export give the same per-request log-likelihoods and task metrics (softmax
export to stock GPT-2, and a twicing export through ``trust_remote_code``); the shipped WikiText
task agrees with ``pretrain.evaluate``; bad task input is refused naming it."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from conftest import need_module  # noqa: E402

lm_eval = need_module("lm_eval")
need_module("accelerate")

from test_export_hf import GPT2, LLAMA, synthetic_checkpoint  # noqa: E402

from pretrain.lm_eval import TASKS_DIR  # noqa: E402

MC, WIKI = "twicing_wikitext_mc", "twicing_wikitext"


@pytest.fixture(scope="module")
def tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)


@pytest.fixture(scope="module")
def softmax_model(tmp_path_factory, wikitext_manifest, one_rank):
    """(our adapter on a GPT-2-style softmax checkpoint, lm-eval's hf model on its export)."""
    from lm_eval.models.huggingface import HFLM

    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.lm_eval_adapter import TwicingLM
    from pretrain.export.hf_export import export

    root = tmp_path_factory.mktemp("lm_eval")
    path = synthetic_checkpoint(root, wikitext_manifest, "soft", **GPT2, activation="gelu")
    meta = export(open_checkpoint(path), root / "hf")
    assert meta["architecture"] == "GPT2LMHeadModel"
    ours = TwicingLM(checkpoint=str(path), batch_size=8)
    theirs = HFLM(
        pretrained=str(root / "hf"),
        device="cpu",
        dtype="float32",
        batch_size=8,
        prefix_token_id=ours.tok.eod,
    )
    return ours, theirs, path


def evaluate(lm, task: str, tasks, limit: int) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], limit=limit, task_manager=tasks, log_samples=True, bootstrap_iters=0
    )


def log_likelihoods(result: dict, task: str) -> list[float]:
    out = []
    for sample in result["samples"][task]:
        for resp in sample["filtered_resps"]:
            out.append(float(resp[0] if isinstance(resp, list | tuple) else resp))
    return out


def metrics(result: dict, task: str) -> dict:
    return {k: v for k, v in result["results"][task].items() if "stderr" not in k}


@pytest.mark.parametrize(("task", "limit"), [(MC, 24), (WIKI, 2)])
def test_peer_check_hf_model_on_the_export(task, limit, softmax_model, tasks):
    """Same requests, same tokens (lm-eval's context/continuation split, no leading token, the
    end-of-document token as the rolling prefix): log-likelihoods ≤ 1e-4 apart, same metrics."""
    ours, theirs, _ = softmax_model
    a, b = evaluate(ours, task, tasks, limit), evaluate(theirs, task, tasks, limit)
    la, lb = log_likelihoods(a, task), log_likelihoods(b, task)
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    print(f"{task}: {len(la)} requests, max |Δ log-likelihood| {diff:.3g}; {metrics(a, task)}")
    assert len(la) == len(lb) >= limit and diff <= 1e-4
    assert min(la) < -20  # real sums over several tokens, not empty continuations
    ma, mb = metrics(a, task), metrics(b, task)
    assert ma.keys() == mb.keys()
    for key, value in ma.items():
        if isinstance(value, float):
            assert math.isclose(value, mb[key], rel_tol=1e-6), (key, value, mb[key])


def test_peer_check_llama_gqa_export(tmp_path, wikitext_manifest, tasks, one_rank):
    """The same on a RoPE + RMSNorm + SwiGLU GQA model (stock ``LlamaForCausalLM`` export)."""
    from lm_eval.models.huggingface import HFLM

    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.lm_eval_adapter import TwicingLM
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(tmp_path, wikitext_manifest, "l", **LLAMA, num_query_groups=2)
    assert export(open_checkpoint(path), tmp_path / "hf")["architecture"] == "LlamaForCausalLM"
    ours = TwicingLM(checkpoint=str(path))
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=8)
    a, b = evaluate(ours, MC, tasks, 12), evaluate(theirs, MC, tasks, 12)
    la, lb = log_likelihoods(a, MC), log_likelihoods(b, MC)
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    print(f"llama-gqa: {len(la)} requests, max |Δ log-likelihood| {diff:.3g}")
    assert len(la) == 48 and diff <= 1e-4
    assert metrics(a, MC) == metrics(b, MC)


def test_wikitext_tasks_agree_with_pretrain_evaluate(softmax_model):
    """Same articles, through the command's own ``run()``. lm-eval: exp(−Σ log p / Σ words),
    words = ``len(re.split(r"\\s+", page))`` of the original article, log p in disjoint windows
    of 64 tokens after one end-of-document token, of the article as is (``twicing_wikitext_raw``)
    or detokenized (``twicing_wikitext``, lm-eval's semantics). pretrain.evaluate: exp(NLL /
    words), whitespace words of the original text, NLL of ``[eod] + doc + [eod]`` per article in
    64-token segments. On the same text the two agree to well under 1 % in log."""
    from pretrain.evaluation.driver import evaluate_text
    from pretrain.evaluation.texts import load_text
    from pretrain.lm_eval import build_parser, run

    ours, _, path = softmax_model
    n = 3
    argv = ["--checkpoint", str(path), "--tasks", f"{WIKI}_raw,{WIKI}", "--limit", str(n)]
    rank, result = run(
        build_parser().parse_args([*argv, "--log-samples", "--bootstrap-iters", "0"])
    )
    raw, detok = (result["results"][t]["word_perplexity,none"] for t in (f"{WIKI}_raw", WIKI))
    text = load_text("wikitext-2-raw:valid", max_documents=n)
    report = evaluate_text(ours.model, ours.tok, text, length=64, stride=64, batch_size=8)
    print(f"word ppl: raw {raw:.4g}, detokenized {detok:.4g}, evaluate {report['word_ppl']:.4g}")
    assert rank == 0 and len(result["samples"][WIKI]) == n
    assert abs(math.log(raw) / math.log(report["word_ppl"]) - 1) < 0.01
    assert abs(math.log(detok) / math.log(report["word_ppl"]) - 1) < 0.05


def test_twicing_export_runs_in_lm_evals_hf_model(tmp_path, wikitext_manifest, tasks, one_rank):
    """A twicing export (custom code) in lm-eval's ``hf`` model with ``trust_remote_code``:
    log-likelihoods equal our adapter's on the checkpoint; greedy ``generate_until`` (HF
    ``generate()`` with its cache vs our incremental decoder) gives the same text."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.lm_eval_adapter import TwicingLM
    from pretrain.export.hf_export import export

    path = synthetic_checkpoint(
        tmp_path, wikitext_manifest, "tw", attention="twicing", num_query_groups=2, num_layers=3
    )
    export(open_checkpoint(path), tmp_path / "hf")
    ours = TwicingLM(checkpoint=str(path))
    theirs = HFLM(
        pretrained=str(tmp_path / "hf"),
        trust_remote_code=True,
        device="cpu",
        dtype="float32",
        batch_size=4,
        prefix_token_id=ours.tok.eod,
    )
    a, b = evaluate(ours, MC, tasks, 8), evaluate(theirs, MC, tasks, 8)
    diff = max(
        abs(x - y) for x, y in zip(log_likelihoods(a, MC), log_likelihoods(b, MC), strict=True)
    )
    assert diff <= 1e-4 and metrics(a, MC) == metrics(b, MC)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}
    requests = [
        Instance("generate_until", {}, (ctx, dict(kwargs)), i)
        for i, ctx in enumerate([" = Robert Boulter = \n", "The album was released in"])
    ]
    texts_ours, texts_theirs = ours.generate_until(requests), theirs.generate_until(requests)
    print(f"log-likelihood diff {diff:.3g}; generations {texts_ours!r} / {texts_theirs!r}")
    assert texts_ours == texts_theirs and all(len(t) > 5 for t in texts_ours)


# ------------------------------------------------------------------------------ bad input


def test_unknown_task_is_named(softmax_model, capsys):
    from pretrain.lm_eval import main

    _, _, path = softmax_model
    assert main(["--checkpoint", str(path), "--tasks", f"{MC},no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'no_such_task'" in err and WIKI in err


def test_unparsable_task_file_is_named(tmp_path, capsys):
    from pretrain.lm_eval import main

    bad = tmp_path / "tasks" / "broken.yaml"
    bad.parent.mkdir()
    bad.write_text("task: broken\ndoc_to_text: [unclosed\n")
    argv = ["--checkpoint", "x", "--tasks", "broken", "--include-path", str(bad.parent)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"task file {bad} does not parse" in err
    assert main([*argv[:4], "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_unreachable_task_dataset_is_named(softmax_model, tmp_path, capsys):
    """A hub task offline (as hellaswag/arc_easy on a machine without the hub): exit 2 naming
    the dataset, not a traceback."""
    from pretrain.lm_eval import main

    _, _, path = softmax_model
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: nobody/no_such_dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\n"
    )
    argv = ["--checkpoint", str(path), "--tasks", "hub_task", "--include-path", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a task's dataset is not reachable" in err and "nobody/no_such_dataset" in err


def test_shipped_tasks_are_offline_and_well_formed(tasks):
    """Both shipped tasks index from configs/lm_eval and build from the local text."""
    built = tasks.load_task_or_group([MC, WIKI])
    mc = built[MC]
    docs = list(mc.validation_docs())
    assert len(docs) == 200 and all(len(d["choices"]) == 4 for d in docs)
    assert all(0 <= d["label"] < 4 for d in docs)
    assert len({d["label"] for d in docs}) == 4  # the answer is not always in one place
    assert len(list(built[WIKI].validation_docs())) > 50  # WikiText-2 valid: 60 articles
