"""Entry point: ``python -m pretrain.train --config configs/<preset>.yaml [dotted.key=value ...]``.

Launch with ``torchrun``, ``srun`` (one task per device) or the ``deepspeed`` launcher. Exit codes
(``data_prep.base.errors.ExitCode``): 0 finished, 75 stopped early with a complete checkpoint
(signal / ``training.exit_at_step``: resume by running the same command again), 2 bad
configuration, 3 non-finite loss under ``halt``, 4 unusable checkpoint, 1 anything else.
"""

from __future__ import annotations

from pretrain.training.signals import StopRequest

#: Installed before anything heavy is imported when run as a program: Slurm signals every
#: process of a step, so a stop that arrives during start-up is remembered instead of killing it.
STOP = StopRequest()
if __name__ == "__main__":
    STOP.install()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from data_prep.base.errors import ExitCode  # noqa: E402
from data_prep.base.run_command import run_cli  # noqa: E402
from pretrain.train_config import TrainConfig, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def prepare(cfg: TrainConfig):
    """Everything that can fail on bad input, before any process-group work."""
    from data_prep.base.errors import ConfigError
    from data_prep.base.output_guard import check_run_dir
    from pretrain.parallel.launch_env import launch_env
    from pretrain.training.data import load_data

    check_run_dir(cfg.run_dir, "config key 'run_dir':", ConfigError)
    env = launch_env()
    cfg.data_parallel_size(env.world_size)
    tokenizer, blend = load_data(cfg)
    return env, tokenizer, blend


def train(cfg: TrainConfig, env, tokenizer, blend) -> int:
    """Run (or resume) the job on this rank; returns its exit code. The run dir is created,
    locked and its ``config.yaml`` written by rank 0 while the ``Trainer`` is built."""
    from pretrain.training.trainer import Trainer

    trainer = Trainer(cfg, env, tokenizer, blend, stop=STOP)
    code = trainer.run()
    trainer.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return ExitCode.OK
        return train(cfg, *prepare(cfg))

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    return run_cli("train", body, prefix=f"[rank {rank}] " if rank is not None else "")


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown after failures: a dead peer can block process-group destructors.
    if status in (ExitCode.OK, ExitCode.RESUMABLE):
        sys.exit(status)
    os._exit(status)
