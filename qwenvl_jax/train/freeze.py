"""Staged freezing: an ordered regex table over dotted parameter paths decides which parameters
train, and the model state is split on it before anything is differentiated.

`split_trainable` returns (graphdef, trainable, frozen): gradients are taken with respect to the
trainable state only (the frozen part enters the loss as a constant, so no gradient is computed
for it), and the optimiser is initialised on the trainable state only, so frozen parameters hold
no optimiser state and are never written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np
from flax import nnx

from qwenvl_jax.errors import ConfigError

log = logging.getLogger(__name__)


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def first_match(
    paths: Iterable[str],
    patterns: Sequence[str],
    table: str,
    scope: str = "parameter of this model",
) -> dict[str, int | None]:
    """{path: index of the first pattern that fully matches it, or None}. A pattern that matches
    none of `paths` (a typo, or a table written for another family) is an error naming `table`
    and `scope`."""
    rows = [re.compile(p) for p in patterns]
    used = [False] * len(rows)
    out: dict[str, int | None] = {}
    for path in paths:
        out[path] = next((i for i, rx in enumerate(rows) if rx.fullmatch(path)), None)
        if out[path] is not None:
            used[out[path]] = True
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
        raise ConfigError(f"{table}: regex {unused[0]!r} matches no {scope}")
    return out


def trainable_mask(paths: Iterable[str], table: Sequence[tuple[str, str]]) -> dict[str, bool]:
    """{path: True if it trains} by the first row whose regex fully matches the path.

    A path no row matches, and a row that matches no path (a typo, or a table written for
    another family), are errors.
    """
    rows = first_match(paths, [p for p, _ in table], "freeze")
    missing = [path for path, i in rows.items() if i is None]
    if missing:
        raise ConfigError(f"freeze: no row matches parameter {missing[0]}")
    return {path: table[i][1] == "train" for path, i in rows.items()}


def param_paths(model: nnx.Module) -> list[str]:
    return [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def trainable_filter(mask: dict[str, bool]):
    """An NNX filter selecting the trainable parameters of `mask`."""

    def is_trainable(path: tuple, value) -> bool:
        return isinstance(value, nnx.Param) and mask.get(path_str(path), False)

    return is_trainable


def _fixed_paths(model: nnx.Module) -> set[str]:
    """Parameters that never train whatever the table says: Qwen-VL v1's fixed sin-cos table
    (`FrozenParam`, whose gradient the forward pass stops)."""
    from qwenvl_jax.models.v1_vision import FrozenParam

    return {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, FrozenParam))}


def split_trainable(
    model: nnx.Module, table: Sequence[tuple[str, str]]
) -> tuple[nnx.GraphDef, nnx.State, nnx.State, dict[str, bool]]:
    """(graphdef, trainable state, everything else, the mask) for a freeze table."""
    mask = trainable_mask(param_paths(model), table)
    for path in _fixed_paths(model):
        if mask[path]:
            log.info("%s is a fixed table: frozen", path)
        mask[path] = False
    if not any(mask.values()):
        raise ConfigError("freeze: the table freezes every parameter; nothing would train")
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(mask), ...)
    return graphdef, trainable, frozen, mask


def summary(model: nnx.Module, mask: dict[str, bool]) -> dict[str, int]:
    """Parameter counts: {"trainable": n, "frozen": m}."""
    sizes = {
        path_str(p): int(np.prod(v.shape))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    out = {"trainable": 0, "frozen": 0}
    for path, n in sizes.items():
        out["trainable" if mask[path] else "frozen"] += n
    return out


__all__ = ["param_paths", "split_trainable", "summary", "trainable_filter", "trainable_mask"]
