"""Which transformer layers use the configured attention variant (the rest use softmax)."""

from __future__ import annotations

from collections.abc import Sequence

LayerSelection = str | Sequence[int]


def select_layers(selection: LayerSelection, num_layers: int) -> frozenset[int]:
    """Resolve a selection to 0-based layer indices.

    ``"all"``, ``"none"``, ``"first:K"``, ``"last:K"`` (the official LM code twices the last 2 of
    16 layers), or an explicit list of 0-based indices.
    """
    if isinstance(selection, str):
        if selection == "all":
            return frozenset(range(num_layers))
        if selection == "none":
            return frozenset()
        kind, _, count = selection.partition(":")
        if kind in ("first", "last") and count.isdigit():
            k = int(count)
            if not 1 <= k <= num_layers:
                raise ValueError(
                    f"attention layers {selection!r}: K={k} must be between 1 and "
                    f"num_layers={num_layers}"
                )
            return (
                frozenset(range(k))
                if kind == "first"
                else frozenset(range(num_layers - k, num_layers))
            )
        raise ValueError(
            f"attention layers {selection!r} is not 'all', 'none', 'first:K', 'last:K' "
            "or a list of indices"
        )
    indices = list(selection)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"attention layer index {i!r} is not an integer in [0, {num_layers})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"attention layer list {indices} repeats an index")
    return frozenset(indices)
