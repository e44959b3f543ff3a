"""The project's error classes and exit codes: a leaf that imports nothing heavy.

Every entry point maps these to one exit code (``data_prep.base.run_command.run_cli``); the
README's table lists the codes.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of every ``python -m pretrain.*`` command (and the Slurm scripts)."""

    #: finished
    OK = 0
    #: an unexpected error (a traceback is printed)
    ERROR = 1
    #: bad configuration or command-line value (the message names the key or value)
    CONFIG = 2
    #: halted on a non-finite loss or gradient (``training.nonfinite: halt``)
    NONFINITE = 3
    #: a checkpoint is missing, incomplete, damaged or incompatible (the message names it)
    CHECKPOINT = 4
    #: stopped early after writing a complete checkpoint (signal, ``exit_at_step``): resume me
    RESUMABLE = 75


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""

    exit_code = ExitCode.CONFIG


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or incompatible; the message names it."""

    exit_code = ExitCode.CHECKPOINT


class NonFiniteError(RuntimeError):
    """Loss or gradient went NaN/inf under the ``halt`` policy."""

    exit_code = ExitCode.NONFINITE


class DataPrepError(Exception):
    """Bad input or configuration of ``data_prep`` (exit 2); the message names the file, field,
    line or corpus at fault."""

    exit_code = ExitCode.CONFIG


class EmptySplitError(DataPrepError):
    """A corpus with blend weight has no document in a split (megatron-core would loop forever)."""
