"""Entry point: ``python -m pretrain.train --config configs/<preset>.yaml [dotted.key=value ...]``.

Launch with ``torchrun``, ``srun`` (one task per device) or the ``deepspeed`` launcher. Exit codes:
0 finished, 75 stopped early with a complete checkpoint (signal / ``training.exit_at_step``: resume
by running the same command again), 2 bad configuration, 3 non-finite loss under ``halt``,
4 unusable checkpoint, 1 anything else.
"""

from __future__ import annotations

from pretrain.signals import EXIT_NONFINITE, StopRequest

#: Installed before the heavy imports below when run as a program: Slurm signals every process
#: of a step, so a stop that arrives during start-up is remembered instead of killing the rank.
STOP = StopRequest()
if __name__ == "__main__":
    STOP.install()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from model.strict_config import ConfigError  # noqa: E402
from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import TrainConfig, load_config  # noqa: E402
from pretrain.launch_env import launch_env  # noqa: E402

EXIT_ERROR, EXIT_CONFIG, EXIT_CHECKPOINT = 1, 2, 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML preset (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML"
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed launcher
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser.parse_args(argv)


def prepare(cfg: TrainConfig):
    """Everything that can fail on bad input, before any process-group work."""
    from pretrain.data import load_data

    env = launch_env()
    cfg.data_parallel_size(env.world_size)
    tokenizer, blend = load_data(cfg)
    return env, tokenizer, blend


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        env, tokenizer, blend = prepare(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from pretrain.trainer import NonFiniteError, Trainer

    if env.rank == 0:
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trainer = Trainer(cfg, env, tokenizer, blend, stop=STOP)
    try:
        trainer.setup()
        code = trainer.run()
    except NonFiniteError as e:
        print(f"[rank {env.rank}] halted: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except CheckpointError as e:
        print(f"[rank {env.rank}] checkpoint error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    except ConfigError as e:
        print(f"[rank {env.rank}] config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Exception:
        traceback.print_exc()
        print(f"[rank {env.rank}] failed", file=sys.stderr, flush=True)
        return EXIT_ERROR
    trainer.close()
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown after failures: a dead peer can block process-group destructors.
    os._exit(status) if status not in (0, 75) else sys.exit(status)
