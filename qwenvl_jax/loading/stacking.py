"""Stacked decoder layers in the model, one entry per layer in checkpoints.

The model holds the decoder layers in stacked runs of [n, ...] arrays (`language_model.runs.{r}.*`:
run r holds the layers `layer_runs` gives, consecutive ones or every p-th of a repeating pattern,
see models/text.py). Checkpoints, Hugging Face and our Orbax folders alike, keep one entry per
layer (`language_model.layers.{i}.*`, the mapping tables' names), so HF <-> Orbax conversion stays
a tensor-by-tensor table and per-layer Orbax folders keep loading.
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
    """Where each decoder layer of a text config lives: run r holds layers `runs[r]`."""

    def __init__(self, text: TextConfig):
        self.runs = layer_runs(text)
        self.run_of = {
            i: (r, j) for r, layers in enumerate(self.runs) for j, i in enumerate(layers)
        }

    def unstack(self, path: str) -> list[str] | None:
        """The per-layer checkpoint paths of a stacked model path, in the run's order (None for a
        path that is not stacked)."""
        m = _RUN.match(path)
        if m is None:
            return None
        return [f"language_model.layers.{i}.{m.group(2)}" for i in self.runs[int(m.group(1))]]

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
    its layers (`take_layer`), in layer order (each layer's parameters in the model's order)
    where the first stacked one appears."""
    layout = Layout(text)
    order: list[tuple[str, Any] | None] = []  # None: the place of the layers
    layers: list[tuple[int, int, str, Any]] = []  # (layer, place in `flat`, path, value)
    for q, (path, value) in enumerate(flat.items()):
        names = layout.unstack(path)
        if names is None:
            order.append((path, value))
            continue
        if not layers:
            order.append(None)
        r = int(_RUN.match(path).group(1))
        layers += [
            (i, q, name, take_layer(value, j))
            for j, (i, name) in enumerate(zip(layout.runs[r], names))
        ]
    out: dict[str, Any] = {}
    for item in order:
        if item is None:
            out.update((name, value) for _, _, name, value in sorted(layers, key=lambda e: e[:2]))
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
                layer = self.layout.runs[int(_RUN.match(path).group(1))][missing]
                name = self.layout.unstack(path)[missing]
                raise CheckpointError(f"checkpoint lacks parameter {name} (layer {layer})")
        return self.values


__all__ = ["Layout", "LayerSlice", "Stacker", "checkpoint_view", "layer_sharding", "materialize"]
