"""Hostile inputs against real training runs (issue 15): tampered ``latest`` pointers and
pickles, two jobs on one run dir, a disk that fills during a save, runs that only skip steps,
a truncated dataset.

Every case runs the real command and asserts the README's exit code, a message naming the
file or value, no Python traceback, and that nothing previously written changed. One tiny
1-rank run (steps 2 and 4 checkpointed) is copied for each case. The cheap cases that need no
run are in ``tests/unit/test_hostile_inputs_unit.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch import run_command
from pretrain_runs import finish, metrics, output, signal_all, start, train, wait_for

#: files a start may (re)write in a run dir without touching what was written before
REWRITTEN = {"config.yaml", ".lock"}


def digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (TensorBoard logs and the files a
    start rewrites left out)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in REWRITTEN and "tensorboard" not in p.parts
    }


def assert_unchanged(root: Path, before: dict[str, str]) -> None:
    """Every file of ``before`` still there, byte for byte, and no new file among the
    checkpoints (a start may add caches and logs beside them)."""
    after = digest(root)
    assert {k: after.get(k) for k in before} == before
    assert not [k for k in set(after) - set(before) if k.startswith("checkpoints")]


def clean(rc_out: tuple[int, str], code: int, *needles: str) -> str:
    """Assert the exit code, every needle in the output, and no traceback."""
    rc, out = rc_out
    assert rc == code, (rc, out[-4000:])
    assert "Traceback" not in out, out[-4000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    return out


def command(*argv: str, timeout: float = 300) -> tuple[int, str]:
    """One process of ``python argv`` (no launcher environment); (exit code, stdout+stderr)."""
    env = {"PATH": os.environ["PATH"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return run_command(list(argv), env, timeout=timeout)


@pytest.fixture(scope="module")
def base_run(wikitext_manifest, tmp_path_factory) -> Path:
    """A tiny 1-rank ZeRO-1 run with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("hostile") / "base"
    train(run_dir, wikitext_manifest, 1, "training.train_steps=4", "checkpoint.interval=2")
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000004"
    return run_dir


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(".lock", "tensorboard"))
    return dest


# ------------------------------------------------------------------------------ latest pointer
def test_latest_naming_another_runs_checkpoint_is_refused(base_run, wikitext_manifest, tmp_path):
    """Before: resumed silently from the other run, and with reshard wrote into it."""
    victim, other = copy_run(base_run, tmp_path / "victim"), copy_run(base_run, tmp_path / "other")
    pointer = victim / "checkpoints" / "latest"
    pointer.write_text("../../other/checkpoints/step_00000004")
    before, before_other = digest(victim), digest(other)
    out = clean(
        train(
            victim, wikitext_manifest, 1, "training.train_steps=6", "parallel.zero_stage=2",
            "checkpoint.reshard=true", check=False,
        )[0],
        4, f"{pointer}: '../../other/checkpoints/step_00000004' is not a checkpoint tag",
    )  # fmt: skip
    assert "resumed" not in out
    assert_unchanged(victim, before)
    assert digest(other) == before_other
    assert not (other / "checkpoints" / "universal").exists()


def test_a_trainer_state_without_keys_is_refused_naming_the_key(
    base_run, wikitext_manifest, tmp_path
):
    from pretrain.checkpoint.layout import CHECKSUMS, file_digest

    run_dir = copy_run(base_run, tmp_path / "nokeys")
    tag = run_dir / "checkpoints" / "step_00000004"
    (tag / "trainer_state.json").write_text("{}")
    sums = json.loads((tag / CHECKSUMS).read_text())
    sums["trainer_state.json"] = file_digest(tag / "trainer_state.json")
    (tag / CHECKSUMS).write_text(json.dumps(sums))
    before = digest(run_dir)
    clean(
        train(run_dir, wikitext_manifest, 1, "training.train_steps=6", check=False)[0],
        4, f"{tag / 'trainer_state.json'}: key 'step' is missing",
    )  # fmt: skip
    assert_unchanged(run_dir, before)


# ------------------------------------------------------------------------------ pickles
class _Payload:
    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):  # unpickling calls open(flag, "w"): the flag file appears
        return (open, (self.flag, "w"))


def tamper(tag_dir: Path, name: str, flag: Path) -> Path:
    """Add a payload to ``name`` and recompute its checksum (a careful attacker's edit)."""
    from pretrain.checkpoint.layout import CHECKSUMS, file_digest

    path = tag_dir / name
    sd = torch.load(path, map_location="cpu", weights_only=False)  # our own, trusted file
    sd["extra"] = _Payload(flag)
    torch.save(sd, path)
    sums = json.loads((tag_dir / CHECKSUMS).read_text())
    sums[name] = file_digest(path)
    (tag_dir / CHECKSUMS).write_text(json.dumps(sums))
    return path


def test_a_tampered_pickle_never_runs(base_run, wikitext_manifest, tmp_path):
    """Resume, reshard, offline conversion and evaluation refuse it (exit 4, the file named);
    the payload's flag file never appears. It is a live payload: a plain unpickle runs it."""
    flag = tmp_path / "PWNED"
    run_a = copy_run(base_run, tmp_path / "a")
    model_file = tamper(run_a / "checkpoints/step_00000004", "mp_rank_00_model_states.pt", flag)
    before = digest(run_a)
    refused = (f"{model_file}: refused to unpickle", "GLOBAL io.open")
    clean(train(run_a, wikitext_manifest, 1, "training.train_steps=6", check=False)[0], 4, *refused)
    clean(
        train(
            run_a, wikitext_manifest, 1, "training.train_steps=6", "parallel.zero_stage=2",
            "checkpoint.reshard=true", check=False,
        )[0],
        4, *refused,
    )  # fmt: skip
    assert not list((run_a / "checkpoints").glob("universal/step_*"))
    clean(
        command(
            "-m", "pretrain.evaluate", "--checkpoint", str(run_a), "--data", "wikitext-2:valid",
            "--max-documents", "1", "--no-oversmoothing", "--no-progress",
        ),
        4, *refused,
    )  # fmt: skip
    run_c = copy_run(base_run, tmp_path / "c")
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim_file = tamper(run_c / "checkpoints/step_00000004", optim, flag)
    clean(command("-m", "pretrain.universal", str(run_c)), 4, f"{optim_file}: refused")
    assert not flag.exists()
    assert_unchanged(run_a, before)
    torch.load(model_file, weights_only=False)  # what DeepSpeed's loaders did before
    assert flag.exists()


# ------------------------------------------------------------------------------ run-dir lock
def test_a_second_job_on_a_live_run_dir_is_refused_and_a_killed_holder_frees_it(
    base_run, wikitext_manifest, tmp_path
):
    run_dir = copy_run(base_run, tmp_path / "locked")
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000004.bak")  # a user's backup
    (ckpts / "step_00000002.damaged").mkdir()
    first = start(run_dir, wikitext_manifest, 1, "training.train_steps=3000")
    try:
        wait_for(lambda: "step 6/3000" in output(first, 0), 300, "the first job's steps", first)
        before = {**digest(ckpts), "config": (run_dir / "config.yaml").read_text()}
        t0 = time.monotonic()
        second = train(run_dir, wikitext_manifest, 1, "training.train_steps=3000", check=False)
        clean(
            second[0], 2, f"run_dir {run_dir} is in use by another job: pid {first[0].pid} on "
            f"host {socket.gethostname()}",
        )  # fmt: skip
        assert time.monotonic() - t0 < 120
        assert {**digest(ckpts), "config": (run_dir / "config.yaml").read_text()} == before
    finally:
        signal_all(first, signal.SIGKILL)
        finish(first)
    third = clean(
        train(run_dir, wikitext_manifest, 1, "training.train_steps=6", check=False)[0],
        0, "ended without releasing", "resumed from step_00000004",
        "ignoring", "step_00000004.bak", "step_00000002.damaged",
    )  # fmt: skip
    assert "step 6/6" in third
    assert (ckpts / "step_00000004.bak" / "COMPLETE").is_file()  # never pruned
    assert (ckpts / "latest").read_text() == "step_00000006"


# ------------------------------------------------------------------------------ disk full
@pytest.fixture
def tiny_disk(tmp_path):
    """Mount a tmpfs of a given size (root only; skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size_kb: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
            capture_output=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_disk_that_fills_during_a_save(wikitext_manifest, tmp_path, tiny_disk):
    """A real ENOSPC mid-save (1 MB tmpfs, a ~2 MB checkpoint): a clear message with the path
    and the size, the partial step dir removed, exit 4."""
    disk = tiny_disk(1024)
    run_dir = tmp_path / "full"
    clean(
        train(
            run_dir, wikitext_manifest, 1, "training.train_steps=2", f"checkpoint.dir={disk}",
            check=False,
        )[0],
        4, f"checkpoint save failed: no space left on {disk} (needed ~", "removed the partial",
    )  # fmt: skip
    assert not list(disk.glob("step_*"))
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2]


def test_a_save_that_would_not_fit_is_refused_before_writing(
    wikitext_manifest, tmp_path, tiny_disk
):
    """The next save needs what the last one took: with less room it is refused up front,
    and the previous complete checkpoint stays the one ``latest`` names."""
    disk = tiny_disk(3 * 1024)
    clean(
        train(
            tmp_path / "run", wikitext_manifest, 1, "training.train_steps=3",
            "checkpoint.interval=1", f"checkpoint.dir={disk}", check=False,
        )[0],
        4, f"checkpoint save failed: no space left on {disk}", "nothing was written",
    )  # fmt: skip
    assert sorted(p.name for p in disk.glob("step_*")) == ["step_00000001"]
    assert (disk / "latest").read_text() == "step_00000001"


def test_a_write_that_fails_on_one_rank_is_agreed_on_and_retried(wikitext_manifest, tmp_path):
    """Rank 1's first checkpoint write fails (an injected EIO): without retries both ranks exit
    4 at once naming rank 1's file, the partial step dir removed; with one retry the save is
    redone and verifies."""
    fault = {"TWICING_FAULT_SAVE_ERROR": "1:1"}
    args = ["training.train_steps=2", "parallel.zero_stage=1"]
    failed = tmp_path / "failed"
    results = train(
        failed, wikitext_manifest, 2, *args, "checkpoint.save_retries=0", env=fault, check=False
    )
    for rc_out in results:
        clean(rc_out, 4, "failed on rank 1: OSError: [Errno 5] injected I/O error",
              "removed the partial directory")  # fmt: skip
    assert not list((failed / "checkpoints").glob("step_*"))

    from pretrain.checkpoint.layout import verify_files

    retried = tmp_path / "retried"
    out = clean(
        train(retried, wikitext_manifest, 2, *args, "checkpoint.save_retries=1", env=fault)[0],
        0, "failed on rank 1 (OSError: [Errno 5] injected I/O error", "retrying in",
    )  # fmt: skip
    assert "saved" in out
    tag = retried / "checkpoints" / "step_00000002"
    assert (tag / "COMPLETE").is_file() and verify_files(tag) == []


# ------------------------------------------------------------------------------ non-finite
def test_a_run_that_only_skips_steps_halts(wikitext_manifest, tmp_path):
    out = clean(
        train(
            tmp_path / "nan", wikitext_manifest, 1, "training.train_steps=20",
            "optimizer.lr=1e30", "training.nonfinite=skip", "training.max_consecutive_skips=3",
            check=False,
        )[0],
        3, "4 consecutive steps had a non-finite loss", "training.max_consecutive_skips=3",
    )  # fmt: skip
    assert "step 20/20" not in out


# ------------------------------------------------------------------------------ data
def test_a_truncated_bin_is_found_by_check_and_refused_by_training(wikitext_manifest, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(wikitext_manifest.parent, data)
    manifest = data / wikitext_manifest.name
    binary = sorted(data.rglob("*train*_text_document.bin"))[0]
    binary.write_bytes(binary.read_bytes()[:-10])
    truncated = (f"{binary} has", "truncated")
    clean(command("-m", "data_prep", "check", str(manifest)), 2, *truncated)
    run_dir = tmp_path / "run"
    clean(train(run_dir, manifest, 1, "training.train_steps=2", check=False)[0], 2, *truncated)
    assert not run_dir.exists()
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 3])  # a truncated manifest: check and training
    bad_json = f"manifest {manifest} is not valid JSON"
    clean(command("-m", "data_prep", "check", str(manifest)), 2, bad_json)
    clean(train(run_dir, manifest, 1, "training.train_steps=2", check=False)[0], 2, bad_json)
    assert not run_dir.exists()


# ------------------------------------------------------------------------------ round two
def test_generate_and_lm_eval_refuse_an_out_over_the_checkpoint_pointer(base_run, tmp_path):
    """Before: both wrote their JSON(L) over ``checkpoints/latest`` (exit 0)."""
    run_dir = copy_run(base_run, tmp_path / "run")
    pointer = run_dir / "checkpoints" / "latest"
    before = digest(run_dir)
    for argv in (
        ["-m", "pretrain.generate", "--checkpoint", str(run_dir), "--prompt", "The"],
        ["-m", "pretrain.lm_eval", "--checkpoint", str(run_dir), "--tasks", "twicing_wikitext_mc"],
    ):
        clean(command(*argv, "--out", str(pointer)), 2, f"--out {pointer} lies inside the")
        assert_unchanged(run_dir, before)
    assert pointer.read_text() == "step_00000004"


@pytest.fixture(scope="module")
def other_tokenizer_manifest(tmp_path_factory) -> Path:
    """WikiText-2 tokenized with another tokenizer (a 512-piece BPE)."""
    from conftest import need_shared

    from data_prep.prepare_wikitext import prepare_wikitext

    out = tmp_path_factory.mktemp("wikitext2-512")
    source = need_shared("data", "wikitext")
    return prepare_wikitext(out, name="wikitext-2", source=source, vocab_size=512, progress=False)


def test_resuming_on_another_tokenizer_is_refused_naming_both(
    base_run, other_tokenizer_manifest, wikitext_manifest, tmp_path
):
    """Before: a run trained with the 1024-piece tokenizer resumed with a manifest of a
    512-piece one and trained on to its last step (exit 0)."""
    from data_prep.manifest import load_manifest

    run_dir = copy_run(base_run, tmp_path / "run")
    before = digest(run_dir)
    theirs = load_manifest(other_tokenizer_manifest).tokenizer()
    ours = load_manifest(wikitext_manifest).tokenizer()
    out = clean(
        train(run_dir, other_tokenizer_manifest, 1, "training.train_steps=6", check=False)[0],
        4, f"tokenizer sha256 {ours.sha256[:16]}… (vocabulary 1024",
        f"{theirs.model_path} (data.manifest) with sha256 {theirs.sha256[:16]}… (vocabulary 512)",
    )  # fmt: skip
    assert "step 5/6" not in out
    assert_unchanged(run_dir, before)


def test_blend_and_check_refuse_datasets_of_another_tokenizer(
    wikitext_manifest, other_tokenizer_manifest, tmp_path
):
    """Before: ``blend --tokenizer B`` accepted datasets tokenized with tokenizer A."""
    from data_prep.manifest import load_manifest

    a = load_manifest(wikitext_manifest)
    b_model = load_manifest(other_tokenizer_manifest).tokenizer_model
    train_a = str(a.blend_per_split["train"][0].prefix)
    out = tmp_path / "mixed.json"
    clean(
        command("-m", "data_prep", "blend", "--tokenizer", str(b_model), "--out", str(out),
                "--train", train_a, "--valid", str(a.blend_per_split["valid"][0].prefix)),
        2, f"dataset {train_a} was tokenized with a tokenizer of sha256",
    )  # fmt: skip
    assert not out.exists()
    # A's manifest edited to name tokenizer B (absolute paths: it is written elsewhere)
    mixed = json.loads(wikitext_manifest.read_text())
    b_sha = load_manifest(other_tokenizer_manifest).tokenizer().sha256
    mixed["tokenizer"].update(model=str(b_model), sha256=b_sha, vocab_size=512)
    for entries in mixed["blend_per_split"].values():
        for e in entries:
            e["prefix"] = str((wikitext_manifest.parent / e["prefix"]).resolve())
    out.write_text(json.dumps(mixed))
    before = out.read_bytes()
    clean(command("-m", "data_prep", "check", str(out)), 2, "was tokenized with a tokenizer of")
    assert out.read_bytes() == before


def test_a_run_dir_that_is_a_regular_file_is_refused(wikitext_manifest, tmp_path):
    """Before: a FileExistsError traceback (exit 1)."""
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    clean(
        train(target, wikitext_manifest, 1, "training.train_steps=2", check=False)[0],
        2, f"config key 'run_dir': {target} is an existing file, not a directory",
    )  # fmt: skip
    assert target.read_text() == "my notes\n"


def test_a_latin1_prompt_file_is_refused_naming_the_byte(base_run, tmp_path):
    """Before: a UnicodeDecodeError traceback."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("Caf\u00e9 society\n".encode("latin-1"))
    run_dir = copy_run(base_run, tmp_path / "run")
    before = digest(run_dir)
    out = tmp_path / "out.jsonl"
    clean(
        command("-m", "pretrain.generate", "--checkpoint", str(run_dir), "--prompt-file",
                str(prompts), "--out", str(out)),
        2, f"--prompt-file {prompts} is not UTF-8 text: byte 0xe9 at offset 3",
    )  # fmt: skip
    assert not out.exists()
    assert_unchanged(run_dir, before)


def test_an_lm_eval_task_with_a_missing_data_file_is_refused(base_run, tmp_path):
    """Before: a FileNotFoundError traceback from ``datasets``."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    missing = tmp_path / "nowhere" / "valid.jsonl"
    (tasks / "local_json.yaml").write_text(
        "task: local_json\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {missing}\n"
        "output_type: loglikelihood_rolling\nvalidation_split: validation\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    run_dir = copy_run(base_run, tmp_path / "run")
    before = digest(run_dir)
    clean(
        command("-m", "pretrain.lm_eval", "--checkpoint", str(run_dir), "--tasks", "local_json",
                "--include-path", str(tasks)),
        2, f"lm-eval task 'local_json' ({tasks / 'local_json.yaml'})", str(missing),
    )  # fmt: skip
    assert_unchanged(run_dir, before)


def test_an_hf_model_with_an_unsafe_pickle_is_refused(base_run, tmp_path):
    """Before: an UnpicklingError traceback (the payload did not run)."""
    export = tmp_path / "hf"
    clean(command("-m", "pretrain.export_hf", "--checkpoint", str(base_run), "--out",
                  str(export)), 0)  # fmt: skip
    weights = export / "model.safetensors"
    from safetensors.torch import load_file

    state = load_file(weights)
    weights.unlink()
    flag = tmp_path / "flag"
    torch.save({**state, "extra": _Payload(flag)}, export / "pytorch_model.bin")
    before = digest(export)
    clean(
        command("-m", "pretrain.evaluate", "--hf-model", str(export), "--data", "wikitext-2:valid",
                "--max-documents", "1", "--out", str(tmp_path / "r.json")),
        4, f"{export}/pytorch_model.bin: refused as unsafe to unpickle", "model.safetensors",
    )  # fmt: skip
    assert not flag.exists() and not (tmp_path / "r.json").exists()
    assert digest(export) == before


@pytest.mark.parametrize("pointer_text", ["", "step_00000009"], ids=["empty", "missing-step"])
def test_an_empty_latest_falls_back_like_one_naming_a_missing_step(
    base_run, wikitext_manifest, tmp_path, pointer_text
):
    """Before: an empty ``latest`` was refused (exit 4) while one naming a missing step fell
    back; now both resume from the newest complete checkpoint with a warning."""
    run_dir = copy_run(base_run, tmp_path / "run")
    pointer = run_dir / "checkpoints" / "latest"
    pointer.write_text(pointer_text)
    out = clean(
        train(run_dir, wikitext_manifest, 1, "training.train_steps=5", check=False)[0],
        0, f"warning: {pointer}", "using the newest complete one, step_00000004",
        "resumed from step_00000004: step 4",
    )  # fmt: skip
    assert "step 5/5" in out and pointer.read_text() == "step_00000005"
