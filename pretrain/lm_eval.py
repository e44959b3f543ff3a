"""Zero-shot evaluation with lm-evaluation-harness: ``python -m pretrain.lm_eval``.

``python -m pretrain.lm_eval --checkpoint RUN --tasks T[,T...] [--include-path DIR] [--limit N]
[--batch-size B] [--num-fewshot K] [--out FILE.json]``

Runs lm-eval's own evaluator (``lm_eval.simple_evaluate``) on the checkpoint through the
``twicing`` model (``pretrain.evaluation.lm_eval_adapter``: any attention variant, any saved TP
size; one process at TP=1, or TP=N under a launcher) and writes lm-eval's results JSON. Tasks
are lm-eval's own (``hellaswag``, ``lambada_openai``, ``arc_easy``, ``piqa``, … — wherever their
datasets are reachable) plus the offline ones shipped in ``configs/lm_eval/`` (always included):
``twicing_wikitext`` (lm-eval's ``wikitext`` document-level word perplexity, detokenizer
included, on the local WikiText-2 validation articles), ``twicing_wikitext_raw`` (the same on the
articles as training sees them) and ``twicing_wikitext_mc`` (multiple choice built from the same
local text). ``--include-path`` adds task directories. See docs/lm_eval.md.

The stock command works too: ``lm_eval --model twicing --model_args checkpoint=RUN --tasks T
--include_path configs/lm_eval`` (after ``python -m pretrain.lm_eval --install-plugin``, which
``make install`` runs).

Exit codes: 0 done, 2 bad arguments, unknown task or a task file that does not parse (the
message names it), 4 missing or damaged checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.base.errors import ConfigError
from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli

#: the offline task YAMLs shipped with the project
TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.lm_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="run dir, checkpoint root, step_* dir or .pt file")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--tokenizer", help="expected tokenizer model; must match the checkpoint's")
    p.add_argument("--tasks", help="comma-separated lm-eval task, group or tag names")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        type=Path,
        help=f"a directory of task YAMLs (repeatable; {TASKS_DIR.name}/ is always included)",
    )
    p.add_argument("--limit", type=float, help="documents per task (or a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random/numpy/torch/fewshot seed")
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="lm-eval's bootstrap resamples for standard errors (0 = none)",
    )
    p.add_argument("--log-samples", action="store_true", help="keep per-request samples")
    output_option(p, "--out", kind="file", allow_in_run=("eval",), type=Path,
                  help="write lm-eval's results JSON here")  # fmt: skip
    p.add_argument(
        "--install-plugin",
        action="store_true",
        help="make the stock `lm_eval --model twicing` work in this Python (writes a .pth)",
    )
    return p


def check_args(args: argparse.Namespace) -> list[Path]:
    """Cheap checks before anything loads; the task directories to index."""
    if not args.checkpoint or not args.tasks:
        raise ConfigError("--checkpoint and --tasks are required (or --install-plugin)")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError(f"--limit must be > 0, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bootstrap_iters < 0:
        raise ConfigError(f"--bootstrap-iters must be >= 0, got {args.bootstrap_iters}")
    dirs = [TASKS_DIR, *args.include_path]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--include-path {d} is not a directory")
    return dirs


def check_task_files(dirs: list[Path]) -> dict[str, tuple[Path, dict]]:
    """Every task YAML must parse (lm-eval's index silently skips one that does not); returns
    ``{task name: (file, config)}``."""
    import yaml

    tasks: dict[str, tuple[Path, dict]] = {}

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for d in dirs:
        for f in sorted(d.rglob("*.yaml")):
            try:
                cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"task file {f} does not parse: {e}") from None
            if not isinstance(cfg, dict):
                raise ConfigError(f"task file {f} is not a YAML mapping (got {type(cfg).__name__})")
            if isinstance(cfg.get("task"), str):
                tasks[cfg["task"]] = (f, cfg)
    return tasks


def check_task_data(names: list[str], tasks: dict[str, tuple[Path, dict]]) -> None:
    """The local files a requested task's ``dataset_kwargs.data_files`` names must exist
    (``datasets`` would fail with a traceback deep inside lm-eval): ``ConfigError`` naming the
    task, its YAML and the missing file. Patterns are globbed; relative paths are tried from the
    working directory, the task's directory and a local ``dataset_path``."""
    import glob

    for name in names:
        if name not in tasks:
            continue
        f, cfg = tasks[name]
        kwargs = cfg.get("dataset_kwargs") or {}
        files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
        if isinstance(files, dict):
            files = [x for v in files.values() for x in (v if isinstance(v, list) else [v])]
        elif isinstance(files, str):
            files = [files]
        bases = [Path.cwd(), f.parent]
        if isinstance(cfg.get("dataset_path"), str) and Path(cfg["dataset_path"]).is_dir():
            bases.append(Path(cfg["dataset_path"]))
        for pattern in files or []:
            if not isinstance(pattern, str) or "://" in pattern:
                continue
            if not any(glob.glob(str(base / pattern)) for base in bases):
                raise ConfigError(
                    f"lm-eval task {name!r} ({f}): dataset_kwargs.data_files names {pattern!r}, "
                    f"which does not exist (looked in {', '.join(str(b) for b in bases)})"
                )


def task_manager(names: list[str], dirs: list[Path]):
    """lm-eval's ``TaskManager`` over ``dirs`` — plus lm-eval's own tasks unless ``dirs`` hold
    every name (indexing lm-eval's thousands of YAMLs takes seconds) — after checking that it
    knows every name (``ConfigError`` naming the first unknown one)."""
    from lm_eval.tasks import TaskManager

    paths = [str(d) for d in dirs]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(name in set(manager.all_tasks) for name in names):
        manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            ours = sorted(n for n in known if n.startswith("twicing_"))
            raise ConfigError(
                f"unknown lm-eval task {name!r} (shipped offline tasks: {', '.join(ours)}; list "
                "all with `lm_eval ls tasks`, add a directory with --include-path)"
            )
    return manager


def run(args: argparse.Namespace) -> tuple[int, dict]:
    """Evaluate; ``(rank, lm-eval's results dict)``."""
    dirs = check_args(args)
    tasks = check_task_files(dirs)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks {args.tasks!r} names no task")
    check_task_data(names, tasks)
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(f"{e}; install the eval extra: pip install -e '.[eval]'") from None
    manager = task_manager(names, dirs)
    from pretrain.evaluation.lm_eval_adapter import TwicingLM

    lm = TwicingLM(
        checkpoint=args.checkpoint,
        tag=args.tag,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
    )
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=args.log_samples,
            bootstrap_iters=args.bootstrap_iters,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
    except FileNotFoundError as e:  # a data file that only lm-eval's own task code names
        raise ConfigError(f"--tasks {args.tasks}: a task's data file is missing: {e}") from None
    except ConnectionError as e:  # a hub dataset of a standard task, offline
        raise ConfigError(
            f"--tasks {args.tasks}: a task's dataset is not reachable: {e}. Offline, populate "
            "HF_DATASETS_CACHE first or use the local tasks of configs/lm_eval"
        ) from None
    return lm.global_rank, results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        guard_outputs(parser, args, ConfigError)  # before anything loads or is written
        if args.install_plugin:
            from pretrain.evaluation.lm_eval_plugin import install

            print(f"lm_eval --model twicing enabled: wrote {install()}")
            return 0
        rank, results = run(args)
        if rank == 0 and results is not None:
            import json

            from lm_eval.utils import handle_non_serializable, make_table

            print(make_table(results), flush=True)
            if args.out is not None:
                from data_prep.base import atomic_write

                text = json.dumps(results, indent=2, default=handle_non_serializable)
                atomic_write.write_text(args.out, text)
                print(f"wrote {args.out}", flush=True)
        from pretrain.parallel.distributed import shutdown

        shutdown()
        return 0

    return run_cli("lm_eval", body)


if __name__ == "__main__":
    sys.exit(main())
