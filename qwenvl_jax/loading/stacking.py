"""Stacked decoder layers in the model, one entry per layer in checkpoints.

The model holds each run of identical decoder layers as one group of [n, ...] arrays
(`language_model.runs.{r}.*`, see models/text.py). Checkpoints, Hugging Face and our Orbax folders
alike, keep one entry per layer (`language_model.layers.{i}.*`, the mapping tables' names), so
HF <-> Orbax conversion stays a tensor-by-tensor table and per-layer Orbax folders keep loading.
This module is the one place that translates: `checkpoint_view` unstacks a model's flat
parameters into per-layer entries (lazily for device arrays), `Stacker` builds the stacked arrays
back from per-layer ones, writing each layer in place into a preallocated sharded array so that a
load never holds a run twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.config import TextConfig
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.models.text import layer_runs

_RUN = re.compile(r"^language_model\.runs\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.(.+)$")


class Layout:
    """Where each decoder layer of a text config lives: run r holds layers [lo, hi)."""

    def __init__(self, text: TextConfig):
        self.runs = layer_runs(text)
        self.run_of = {
            i: (r, i - lo) for r, (lo, hi) in enumerate(self.runs) for i in range(lo, hi)
        }

    def unstack(self, path: str) -> list[str] | None:
        """The per-layer checkpoint paths of a stacked model path, in layer order (None for a
        path that is not stacked)."""
        m = _RUN.match(path)
        if m is None:
            return None
        lo, hi = self.runs[int(m.group(1))]
        return [f"language_model.layers.{i}.{m.group(2)}" for i in range(lo, hi)]

    def locate(self, path: str) -> tuple[str, int] | None:
        """(stacked model path, index in the run) of a per-layer checkpoint path, None for a path
        that is not per-layer, CheckpointError for a layer the model does not have."""
        m = _LAYER.match(path)
        if m is None:
            return None
        i = int(m.group(1))
        if i not in self.run_of:
            raise CheckpointError(f"parameter {path}: the model has {len(self.run_of)} layers")
        r, j = self.run_of[i]
        return f"language_model.runs.{r}.{m.group(2)}", j


def layer_sharding(sharding: Any) -> Any:
    """The sharding of one layer of a stacked array (the "layers" axis is never split)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


class LayerSlice:
    """Layer j of a stacked device array, taken only when asked (`value()`)."""

    def __init__(self, array: jax.Array, j: int):
        self.array, self.j = array, j
        self.shape, self.dtype = tuple(array.shape[1:]), array.dtype

    def value(self) -> jax.Array:
        return self.array[self.j]


def take_layer(value: Any, j: int) -> Any:
    """Layer j of a stacked value: a ShapeDtypeStruct (with the layer's sharding), a host array
    (a view) or a device array (a `LayerSlice`)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        sharding = getattr(value, "sharding", None)
        return jax.ShapeDtypeStruct(
            value.shape[1:], value.dtype, sharding=layer_sharding(sharding) if sharding else None
        )
    if isinstance(value, np.ndarray):
        return value[j]
    return LayerSlice(value, j)


def materialize(value: Any) -> Any:
    return value.value() if isinstance(value, LayerSlice) else value


def checkpoint_view(flat: Mapping[str, Any], text: TextConfig) -> dict[str, Any]:
    """{checkpoint path: value}: the model's flat parameters with every stacked one replaced by
    its layers (`take_layer`), a run's layers in layer order where the run first appears."""
    layout = Layout(text)
    out: dict[str, Any] = {}
    pending: dict[int, list[tuple[list[str], Any]]] = {}
    order: list[Any] = []
    for path, value in flat.items():
        names = layout.unstack(path)
        if names is None:
            order.append((path, value))
            continue
        r = int(_RUN.match(path).group(1))
        if r not in pending:
            pending[r] = []
            order.append(r)
        pending[r].append((names, value))
    for item in order:
        if isinstance(item, int):
            group = pending[item]
            for j in range(len(group[0][0])):
                for names, value in group:
                    out[names[j]] = take_layer(value, j)
        else:
            out[item[0]] = item[1]
    return out


def _set_layer(stacked: jax.Array, layer: jax.Array, j: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), j, 0)


_set_layer_jit = jax.jit(_set_layer, donate_argnums=0)


class Stacker:
    """Builds a model's flat parameters from per-layer checkpoint entries.

    `targets` is the model's flat {path: ShapeDtypeStruct (with sharding)}; `put(checkpoint
    path, array)` takes each parameter, or one layer of a stacked one, already placed with the
    sharding `checkpoint_view(targets)` gives it; `result()` is {model path: array}. A stacked
    array is allocated at its first layer and written layer by layer in place.
    """

    def __init__(self, targets: Mapping[str, jax.ShapeDtypeStruct], text: TextConfig):
        self.targets, self.layout = targets, Layout(text)
        self.values: dict[str, jax.Array] = {}
        self.filled: dict[str, set[int]] = {}

    def put(self, path: str, array: jax.Array) -> None:
        where = self.layout.locate(path)
        if where is None:
            self.values[path] = array
            return
        stacked_path, j = where
        target = self.targets[stacked_path]
        if stacked_path not in self.values:
            sharding = getattr(target, "sharding", None)
            zeros = jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=sharding)
            self.values[stacked_path] = zeros()
            self.filled[stacked_path] = set()
        self.values[stacked_path] = _set_layer_jit(
            self.values[stacked_path], array, jnp.asarray(j, jnp.int32)
        )
        self.filled[stacked_path].add(j)

    def result(self) -> dict[str, jax.Array]:
        for path, done in self.filled.items():
            n = self.targets[path].shape[0]
            if len(done) != n:
                missing = min(set(range(n)) - done)
                lo = self.layout.runs[int(_RUN.match(path).group(1))][0]
                name = self.layout.unstack(path)[missing]
                raise CheckpointError(f"checkpoint lacks parameter {name} (layer {lo + missing})")
        return self.values


__all__ = ["Layout", "LayerSlice", "Stacker", "checkpoint_view", "layer_sharding", "materialize"]
