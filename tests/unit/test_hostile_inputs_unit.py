"""Hostile inputs that need no training run (issue 15, the cheap half of the probe suite).

Every CLI case runs the real command in a subprocess and asserts the README's exit code, a
message naming the culprit, no Python traceback, and that nothing previously written changed.
The checkpoint-side cases (tampered pickles, the run-dir lock, a full disk, non-finite runs) are
in ``tests/integration/test_hostile_inputs.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.base.errors import CheckpointError, ConfigError, DataPrepError
from data_prep.base.output_guard import check_output
from pretrain.checkpoint import layout
from pretrain.checkpoint.state import TrainerState

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ helpers
def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(*argv: str, code: int, needles: tuple[str, ...] = (), cwd: Path = ROOT) -> str:
    """Run ``python argv``; assert the exit code, each needle in stderr, no traceback."""
    run = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], "DS_ACCELERATOR": "cpu", "HF_DATASETS_OFFLINE": "1"},
    )
    err = run.stderr
    assert run.returncode == code, (run.returncode, run.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    return err


def fake_run(root: Path) -> Path:
    """A run directory as training leaves it (the guard looks at its shape, not at weights)."""
    run = root / "run"
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "trainer_state.json").write_text("{}")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (tag / "COMPLETE").write_text("step_00000004\n")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    return run


# ------------------------------------------------------------------------------ tags
def test_only_exact_tags_are_tags():
    assert layout.is_tag("step_00000010")
    for bad in ("step_10", "step_00000010.bak", "../step_00000010", "step_0000001x", "x"):
        assert not layout.is_tag(bad)
        with pytest.raises(CheckpointError, match="not a checkpoint tag"):
            layout.step_of(bad)


def test_latest_pointing_outside_the_checkpoint_dir_is_an_error_naming_it(tmp_path):
    run = fake_run(tmp_path)
    other = fake_run(tmp_path / "other")
    pointer = run / "checkpoints" / "latest"
    pointer.write_text(f"../../other/{other.name}/checkpoints/step_00000004")
    with pytest.raises(CheckpointError, match=r"latest: '\.\./\.\./other.*not a checkpoint tag"):
        layout.latest_complete(run / "checkpoints")


def test_backup_and_damaged_dirs_are_ignored_with_a_warning(tmp_path, capsys):
    run = fake_run(tmp_path)
    root = run / "checkpoints"
    for name in ("step_00000010.bak", "step_00000010.damaged"):
        (root / name).mkdir()
        (root / name / "COMPLETE").write_text("x")
    (root / "latest").unlink()
    assert layout.complete_tags(root) == ["step_00000004"]
    assert layout.latest_complete(root) == "step_00000004"
    warned = capsys.readouterr().err
    assert "step_00000010.bak" in warned and "step_00000010.damaged" in warned


@pytest.mark.parametrize("name", ["../../x/trainer_state.json", "/etc/passwd", "a/../../b"])
def test_checksum_entries_must_stay_inside_the_step_dir(tmp_path, name):
    tag = fake_run(tmp_path) / "checkpoints" / "step_00000004"
    (tag / "checksums.json").write_text(json.dumps({name: {"size": 1, "xxh3_128": "0"}}))
    with pytest.raises(CheckpointError, match=r"checksums.json: entry .* not a file inside"):
        layout.verify_files(tag)


def test_verification_compares_every_files_size_and_digest(tmp_path):
    """``verify_files`` against ``checksums.json``: an intact step passes; a changed size and a
    same-size flipped byte are each named; a missing file too."""
    tag = tmp_path / "step_00000002"
    tag.mkdir()
    (tag / "a.pt").write_bytes(b"weights" * 100)
    (tag / "b.pt").write_bytes(b"optimizer" * 100)
    sums = {n: layout.file_digest(tag / n) for n in ("a.pt", "b.pt")}
    (tag / layout.CHECKSUMS).write_text(json.dumps(sums))
    assert layout.verify_files(tag) == []
    (tag / "a.pt").write_bytes(b"weights" * 99)  # truncated
    data = bytearray((tag / "b.pt").read_bytes())
    data[17] ^= 0x01  # one bit, same size
    (tag / "b.pt").write_bytes(bytes(data))
    problems = layout.verify_files(tag)
    assert problems == [
        f"{tag / 'a.pt'}: 693 bytes, expected 700 (truncated?)",
        f"{tag / 'b.pt'}: checksum mismatch (corrupted)",
    ]
    (tag / "a.pt").unlink()
    assert layout.verify_files(tag, ["a.pt"]) == [f"{tag / 'a.pt'}: missing"]


class _Payload:
    """Unpickling this calls ``open(flag, "w")``: creates the flag file (code execution)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_a_tampered_consolidated_file_never_runs(tmp_path):
    """A consolidated ``.pt`` carrying a pickled call is refused by the loader every reader
    (evaluate, generate, lm_eval, export_hf) goes through; nothing in it runs."""
    import torch

    from pretrain.checkpoint import consolidated
    from pretrain.checkpoint.reader import open_checkpoint

    flag = tmp_path / "flag"
    path = tmp_path / "model.pt"
    torch.save(
        {"format": consolidated.FORMAT, "format_version": 1, "state_dict": {},
         "trainer_state": {}, "tokenizer_model": torch.zeros(1), "x": _Payload(flag)},
        path,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"model\.pt.*refused to unpickle"):
        consolidated.load(path)
    with pytest.raises(CheckpointError, match=r"model\.pt.*refused to unpickle"):
        open_checkpoint(path)
    assert not flag.exists()


def test_an_empty_trainer_state_names_the_missing_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"state.json: key 'step' is missing"):
        TrainerState.from_json({}, tmp_path / "state.json")


# ------------------------------------------------------------------------------ output guard
def test_output_guard_refuses_run_dirs_their_insides_and_their_parents(tmp_path):
    run = fake_run(tmp_path)
    cases = {
        run: "is the run directory",
        run / "checkpoints": "is the checkpoint directory",
        run / "checkpoints" / "step_00000004": "is the checkpoint",
        run / "hf": "lies inside the run directory",
        run / "checkpoints" / "new": "lies inside the checkpoint directory",
        tmp_path: "contains the run directory",
    }
    for path, message in cases.items():
        with pytest.raises(DataPrepError, match=message):
            check_output(path, "--out", "dir")
    with pytest.raises(DataPrepError, match="lies inside the checkpoint directory"):
        check_output(run / "checkpoints" / "latest", "--out", "file", allow_eval_dir=True)
    assert check_output(run / "eval" / "r.json", "--out", "file", allow_eval_dir=True)
    assert check_output(tmp_path / "elsewhere", "--out", "dir")


def test_output_guard_refuses_wrong_kinds_and_paths_under_files(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file; expected a directory"):
        check_output(f, "--out", "dir", error=ConfigError)
    with pytest.raises(ConfigError, match="is an existing directory; expected a file"):
        check_output(tmp_path, "--out", "file", error=ConfigError)
    with pytest.raises(ConfigError, match=f"{f} is a regular file"):
        check_output(f / "sub" / "x", "--out", "dir", error=ConfigError)


# ------------------------------------------------------------------------------ commands
def test_export_consolidate_evaluate_refuse_outputs_in_the_run(tmp_path):
    """The data-loss bug: ``export_hf --out`` = the run dir used to delete the checkpoints."""
    run = fake_run(tmp_path)
    before = tree_digest(run)
    ck = ["--checkpoint", str(run)]
    cli("-m", "pretrain.export_hf", *ck, "--out", str(run), code=2, needles=(f"--out {run} is",))
    cli("-m", "pretrain.export_hf", *ck, "--out", str(run / "hf"), code=2, needles=("lies inside",))
    cli("-m", "pretrain.export_hf", *ck, "--out", str(tmp_path), code=2, needles=("contains the",))
    out = run / "checkpoints" / "model.pt"
    cli("-m", "pretrain.consolidate", *ck, "--out", str(out), code=2, needles=(str(out),))
    latest = run / "checkpoints" / "latest"
    cli("-m", "pretrain.evaluate", *ck, "--out", str(latest), code=2, needles=(str(latest),))
    assert tree_digest(run) == before


def test_export_and_consolidate_refuse_outputs_of_the_wrong_kind(tmp_path):
    run = fake_run(tmp_path)
    some_dir = tmp_path / "notes"
    some_dir.mkdir()
    (some_dir / "keep.txt").write_text("mine")
    some_file = tmp_path / "notes.txt"
    some_file.write_text("mine too")
    ck = ["--checkpoint", str(run)]
    cli(
        "-m", "pretrain.export_hf", *ck, "--out", str(some_dir), code=2,
        needles=("is not an earlier Hugging Face export",),
    )  # fmt: skip
    cli(
        "-m", "pretrain.export_hf", *ck, "--out", str(some_file), code=2,
        needles=("is an existing file",),
    )  # fmt: skip
    cli(
        "-m", "pretrain.consolidate", *ck, "--out", str(some_dir), code=2,
        needles=("is an existing directory",),
    )  # fmt: skip
    cli(
        "-m", "pretrain.consolidate", *ck, "--out", str(some_file), code=2,
        needles=("is not a consolidated checkpoint",),
    )  # fmt: skip
    assert (some_dir / "keep.txt").read_text() == "mine" and some_file.read_text() == "mine too"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--stride", "0", "--protocol", "sliding"], "--stride 0 must be >= 1"),
        (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--length", "-3"], "--length -3 must be >= 1"),
        (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer /nonexistent/tok.model"),
        (["--swap-rates", "nan"], "--swap-rates nan"),
    ],
)
def test_evaluate_refuses_bad_arguments_before_loading(tmp_path, args, needle):
    run = fake_run(tmp_path)
    cli("-m", "pretrain.evaluate", "--checkpoint", str(run), *args, code=2, needles=(needle,))


def test_evaluate_refuses_an_out_that_is_a_directory_or_another_file(tmp_path):
    run = fake_run(tmp_path)
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    ck = ["-m", "pretrain.evaluate", "--checkpoint", str(run)]
    cli(*ck, "--out", str(tmp_path), code=2, needles=("is an existing directory",))
    cli(*ck, "--out", str(other), code=2, needles=("is not an earlier evaluation result",))
    assert other.read_text() == '{"mine": 1}'


# ------------------------------------------------------------------------------ config
CONFIG_CASES = [
    (["model.ffn_hidden_size=-5"], "'model.ffn_hidden_size': must be > 0"),
    (["optimizer.betas=[0.9, 1.5]"], "'optimizer.betas[1]': must be in [0, 1), got 1.5"),
    (["optimizer.betas=[-0.1, 0.9]"], "'optimizer.betas[0]'"),
    (["training.eval_steps=-1"], "'training.eval_steps': must be >= 0, got -1"),
    (["training.eval_interval=5", "training.eval_steps=0"], "'training.eval_steps'"),
    (["model.num_layers=[1,"], "override 'model.num_layers=[1,': the value '[1,' is not valid"),
    (["training.max_consecutive_skips=-1"], "'training.max_consecutive_skips'"),
]


@pytest.mark.parametrize("overrides, needle", CONFIG_CASES, ids=lambda c: str(c)[:40])
def test_bad_config_values_exit_2_naming_the_key_and_create_nothing(tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    cli(
        "-m", "pretrain.train", "--config", "configs/demo.yaml", f"run_dir={run_dir}",
        *overrides, code=2, needles=(needle,),
    )  # fmt: skip
    assert not run_dir.exists()


def test_duplicate_yaml_keys_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    preset = tmp_path / "dup.yaml"
    preset.write_text(
        (ROOT / "configs/demo.yaml").read_text()
        + f"\nrun_dir: {run_dir}\nmodel:\n  num_layers: 4\n"
    )
    cli("-m", "pretrain.train", "--config", str(preset), code=2, needles=("duplicate key",))
    assert not run_dir.exists()


# ------------------------------------------------------------------------------ data_prep
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny tokenizer, one indexed dataset and its manifest (written by data_prep's own API)."""
    import sentencepiece as spm

    from data_prep.indexed import write_dataset
    from data_prep.manifest import BlendEntry, Manifest

    d = tmp_path_factory.mktemp("hostile-data")
    text = d / "text.txt"
    text.write_text(
        "\n".join(f"line {i} of a small corpus about words {i % 7}" for i in range(300))
    )
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(d / "tok"), vocab_size=60, model_type="bpe",
        minloglevel=2,
    )  # fmt: skip
    tokens = np.arange(400, dtype=np.uint16) % 50
    write_dataset(d / "c_text_document", tokens, np.full(40, 10), np.uint16)
    Manifest(d / "tok.model", [BlendEntry(d / "c_text_document", 1.0)], "1,0,0").save(
        d / "manifest.json"
    )
    return d


def test_data_prep_check_accepts_the_good_dataset(dataset):
    run = subprocess.run(
        [sys.executable, "-m", "data_prep", "check", str(dataset / "manifest.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0 and '"ok": true' in run.stdout, run.stderr


def test_data_prep_refuses_hostile_inputs(dataset, tmp_path):
    before = tree_digest(dataset)
    dp = ["-m", "data_prep"]
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a sentencepiece model" * 10)
    prefix = str(dataset / "c_text_document")
    blend = [*dp, "blend", "--tokenizer", str(dataset / "tok.model")]
    cli(*dp, "blend", "--tokenizer", str(garbage), "--corpus", prefix, "--split", "1,0,0",
        "--out", str(tmp_path / "m.json"), code=2,
        needles=(f"{garbage} is not a sentencepiece model",))  # fmt: skip
    regular = tmp_path / "regular"
    regular.write_text("x")
    cli(*dp, "tokenize", "--corpus", f"c={dataset / 'text.txt'}", "--tokenizer",
        str(dataset / "tok.model"), "--out-dir", str(regular / "out"), code=2,
        needles=(f"{regular} is a regular file",))  # fmt: skip
    cli(*dp, "train-tokenizer", "--corpus", f"c={dataset / 'text.txt'}", "--out",
        str(regular / "tok"), code=2, needles=(f"{regular} is a regular file",))  # fmt: skip
    cli(*blend, "--corpus", prefix, "--split", "1,0,0", "--out", str(regular / "m.json"),
        code=2, needles=(f"{regular} is a regular file",))  # fmt: skip
    for weight in ("nan", "inf"):
        cli(*blend, "--corpus", f"{prefix}:{weight}", "--split", "1,0,0", "--out",
            str(tmp_path / "m.json"), code=2, needles=(f"got {weight}",))  # fmt: skip
    for split in ("abc", "1,2,3,4", "-1,1", "0,0,0"):
        cli(*blend, "--corpus", prefix, f"--split={split}", "--out", str(tmp_path / "m.json"),
            code=2, needles=(f"split {split!r} is not a split string",))  # fmt: skip
    assert not (tmp_path / "m.json").exists()
    assert tree_digest(dataset) == before


def test_data_prep_check_finds_truncated_manifests_and_bins(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest = copy / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    cli("-m", "data_prep", "check", str(manifest), code=2,
        needles=(f"manifest {manifest} is not valid JSON",))  # fmt: skip
    manifest.write_text(good)
    binary = copy / "c_text_document.bin"
    binary.write_bytes(binary.read_bytes()[:-7])
    cli("-m", "data_prep", "check", str(manifest), code=2,
        needles=(f"{binary} has 793 bytes but", "truncated"))  # fmt: skip


def test_data_prep_out_dir_in_a_run_is_refused(tmp_path, dataset):
    run = fake_run(tmp_path)
    before = tree_digest(run)
    cli("-m", "data_prep", "tokenize", "--corpus", f"c={dataset / 'text.txt'}", "--tokenizer",
        str(dataset / "tok.model"), "--out-dir", str(run / "data"), code=2,
        needles=("lies inside the run directory",))  # fmt: skip
    assert tree_digest(run) == before


# ------------------------------------------------------------------------------ word ppl
def test_word_perplexity_both_conventions(dataset):
    """word_ppl divides by whitespace words; word_ppl_eol by words + one end-of-line per line
    (Transformer-XL / lmtool). A constant NLL per token makes both exact to check."""
    import torch

    from data_prep.sentencepiece_tokenizer import SentencePieceTokenizer
    from pretrain.evaluation.driver import evaluate_text
    from pretrain.evaluation.texts import EvalText

    text = EvalText("t", ["one two three\nfour five\n", "six seven\neight"])
    assert (text.words, text.lines, text.line_ends) == (8, 3, 4)
    tok = SentencePieceTokenizer(dataset / "tok.model")

    def nll(tokens, positions, labels):
        return torch.full(tokens.shape, 0.5)

    r = evaluate_text(None, tok, text, length=8, stride=8, batch_size=2, token_nll_fn=nll)
    total = 0.5 * r["tokens"]
    assert math.isclose(r["word_ppl"], math.exp(total / 8))
    assert math.isclose(r["word_ppl_eol"], math.exp(total / 12))
    assert r["words_eol"] == 12

    from pretrain.evaluation.driver import summary

    report = {
        "checkpoint": "c", "step": 1, "model": {"attention": "twicing"}, "tensor_parallel": 1,
        "data": {"spec": "t", "documents": 2, "words": 8}, "oversmoothing": None,
        "protocol": {"name": "segments", "length": 8, "stride": 8},
        "results": [{"swap_rate": 0.0, **r}],
    }  # fmt: skip
    table = summary(report, Path("out.json")).splitlines()
    header = next(i for i, line in enumerate(table) if "word+eol ppl" in line)
    assert f"{r['word_ppl_eol']:.3f}" in table[header + 1]
    assert f"{r['word_ppl']:.3f}" in table[header + 1]


def test_wikitext103_valid_word_counts_of_both_conventions():
    """213,886 whitespace words; 217,646 = words + 3,760 lines, Transformer-XL's count."""
    from conftest import need_shared

    from data_prep.wikitext import load_articles
    from pretrain.evaluation.texts import EvalText

    source = need_shared("data", "wikitext")
    text = EvalText("wt103", [a.text for a in load_articles("wikitext-103", "valid", source)])
    assert text.words == 213_886
    assert text.words + text.line_ends == 217_646


# ------------------------------------------------------------------ every command's outputs
#: every command of the project: its module and the parser it builds
COMMANDS = {
    "pretrain.train": "pretrain.train",
    "pretrain.evaluate": "pretrain.evaluate",
    "pretrain.generate": "pretrain.generate",
    "pretrain.lm_eval": "pretrain.lm_eval",
    "pretrain.export_hf": "pretrain.export_hf",
    "pretrain.import_hf": "pretrain.import_hf",
    "pretrain.consolidate": "pretrain.consolidate",
    "pretrain.universal": "pretrain.universal",
    "pretrain.demo": "pretrain.demo",
    "data_prep": "data_prep.cli",
}
#: top-level pretrain modules that are not commands with a parser of their own
NOT_COMMANDS = {"pretrain.faults", "pretrain.train_config", "pretrain.local_launch"}
#: options that name inputs although their names could suggest an output
INPUTS = {"--include-path", "--checkpoint", "--hf-model", "--tokenizer", "--source",
          "--wikitext", "--manifest", "--config", "--prompt-file"}  # fmt: skip
#: (command, subcommand, flag) -> the rest of a command line that reaches the output check
OUTPUT_CASES = {
    ("pretrain.evaluate", None, "--out"): ["--checkpoint", "{run}"],
    ("pretrain.evaluate", None, "--png"): ["--checkpoint", "{run}"],
    ("pretrain.evaluate", None, "--tensorboard"): ["--checkpoint", "{run}"],
    ("pretrain.generate", None, "--out"): ["--checkpoint", "{run}", "--prompt", "The"],
    ("pretrain.lm_eval", None, "--out"): ["--checkpoint", "{run}", "--tasks", "twicing_wikitext"],
    ("pretrain.export_hf", None, "--out"): ["--checkpoint", "{run}"],
    ("pretrain.import_hf", None, "--out"): ["--hf-model", "{fresh}"],
    ("pretrain.consolidate", None, "--out"): ["--checkpoint", "{run}"],
    ("data_prep", "wikitext", "--out-dir"): ["wikitext"],
    ("data_prep", "wikitext", "--export-hub-layout"): ["wikitext"],
    ("data_prep", "wikitext", "--cache-dir"): ["wikitext", "--out-dir", "{fresh}"],
    ("data_prep", "train-tokenizer", "--out"): ["train-tokenizer", "--corpus", "c={fresh}/c.txt"],
    ("data_prep", "tokenize", "--out-dir"):
        ["tokenize", "--corpus", "c={fresh}/c.txt", "--tokenizer", "{fresh}/t.model"],
    ("data_prep", "blend", "--out"):
        ["blend", "--tokenizer", "{fresh}/t.model", "--corpus", "{fresh}/p", "--split", "1"],
}  # fmt: skip


def _parsers():
    """(command, subcommand, parser) for every parser of every command (subcommands too)."""
    import argparse
    import importlib

    for command, module in COMMANDS.items():
        top = importlib.import_module(module).build_parser()
        yield command, None, top, top
        for action in top._actions:  # argparse keeps subcommands here (stdlib, read-only)
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield command, name, sub, top


def test_every_command_is_enumerated():
    found = {f"pretrain.{p.stem}" for p in (ROOT / "pretrain").glob("*.py") if p.stem != "__init__"}
    assert found - NOT_COMMANDS == set(COMMANDS) - {"data_prep"}


def test_every_output_option_is_declared_and_has_a_case():
    """Each option whose name suggests a path it writes is declared with ``output_option`` (so
    ``guard_outputs`` checks it), and every declared one has a refusal case below."""
    import re

    from data_prep.base.output_guard import declared_outputs

    looks_like_output = re.compile(r"out|png|tensorboard|export|save|cache|dir|path|log|result")
    cases = set()
    for command, sub, parser, top in _parsers():
        declared = {o.dest for o in declared_outputs(top)}
        for action in parser._actions:
            flags = [f for f in action.option_strings if f.startswith("--")]
            if not flags or flags[0] in INPUTS or action.nargs == 0:  # switches hold no path
                continue
            if action.dest in declared:
                cases.add((command, sub, flags[0]))
            else:
                assert not looks_like_output.search(flags[0]), (
                    f"{command} {sub or ''} {flags[0]}: declare it with output_option (or list "
                    "it in INPUTS if it is read, not written)"
                )
    assert cases == set(OUTPUT_CASES)


@pytest.mark.parametrize("case", list(OUTPUT_CASES), ids=lambda c: " ".join(x for x in c if x))
def test_every_output_option_refuses_a_run_and_its_insides(tmp_path, case):
    """The real command, with the output pointed at a run's checkpoint pointer, its checkpoint
    directory, a step directory, and a new path directly inside the run: exit 2 naming the
    option, nothing written, the run byte for byte as it was."""
    from data_prep.base.output_guard import declared_outputs

    command, sub, flag = case
    import importlib

    top = importlib.import_module(COMMANDS[command]).build_parser()
    kind = next(o.kind for o in declared_outputs(top) if o.flag == flag)
    run = fake_run(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ckpts = run / "checkpoints"
    targets = (
        [ckpts / "latest", ckpts / "step_00000004" / "x.json", run / "new.json"]
        if kind == "file"
        else [ckpts, ckpts / "step_00000004" / "sub", run / "newdir"]
    )
    before = tree_digest(run)
    module = "data_prep" if command == "data_prep" else command
    for target in targets:
        rest = [a.format(run=run, fresh=fresh) for a in OUTPUT_CASES[case]]
        cli("-m", module, *rest, flag, str(target), code=2, needles=(flag, "refusing to write"))
        assert tree_digest(run) == before, target
        assert not list(fresh.iterdir())
