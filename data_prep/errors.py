"""The one exception type data_prep raises for bad input or configuration."""

from __future__ import annotations


class DataPrepError(Exception):
    """A user-facing error; the message names the file, field, line or corpus at fault."""


class EmptySplitError(DataPrepError):
    """A corpus with blend weight has no document in a split (megatron-core would loop forever)."""
