"""Stacked decoder layers and ViT blocks in the model, one entry per layer in checkpoints.

The model holds the decoder layers in stacked runs of [n, ...] arrays (`language_model.runs.{r}.*`:
run r holds the layers `layer_runs` gives, consecutive ones or every p-th of a repeating pattern,
see models/text.py), and the modern vision towers their blocks likewise (`visual.runs.{r}.*`,
`block_runs` in models/vision.py). Checkpoints, Hugging Face and our Orbax folders alike, keep one
entry per layer (`language_model.layers.{i}.*`, `visual.blocks.{i}.*`: the mapping tables' names),
so HF <-> Orbax conversion stays a tensor-by-tensor table and per-layer Orbax folders keep loading.
This module is the one place that translates: `checkpoint_view` unstacks a model's flat
parameters into per-layer entries (lazily for device arrays), `Stacker` builds the stacked arrays
back from per-layer ones, writing each layer in place into a preallocated sharded array so that a
load never holds a run twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.config import ModelConfig, VisionConfig
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.models.text import layer_runs
from qwenvl_jax.models.vision import block_runs


class Stack(NamedTuple):
    """One stacked module: its runs `{stacked}.{r}.*` hold the layers `{per_layer}.{i}.*` of
    `runs[r]`; `unit` names a layer in messages."""

    stacked: str
    per_layer: str
    unit: str
    runs: list[range]


class Layout:
    """Where each decoder layer and ViT block of a model config lives: run r of a stack holds
    its layers `runs[r]`."""

    def __init__(self, config: ModelConfig):
        self.stacks = [
            Stack("language_model.runs", "language_model.layers", "layer", layer_runs(config.text))
        ]
        if isinstance(config.vision, VisionConfig):  # Qwen-VL v1's tower is not stacked
            self.stacks.append(
                Stack("visual.runs", "visual.blocks", "block", block_runs(config.vision))
            )

        def pattern(prefixes):
            alternatives = "|".join(map(re.escape, prefixes))
            return re.compile(rf"^({alternatives})\.(\d+)\.(.+)$")

        self._run = pattern(s.stacked for s in self.stacks)
        self._layer = pattern(s.per_layer for s in self.stacks)
        self._by_stacked = {s.stacked: s for s in self.stacks}
        self._by_layer = {s.per_layer: s for s in self.stacks}
        self.run_of = {
            s.per_layer: {i: (r, j) for r, run in enumerate(s.runs) for j, i in enumerate(run)}
            for s in self.stacks
        }

    def run(self, path: str) -> tuple[Stack, int, str] | None:
        """(stack, run, parameter name within a layer) of a stacked model path, None for a path
        that is not stacked."""
        m = self._run.match(path)
        if m is None:
            return None
        return self._by_stacked[m.group(1)], int(m.group(2)), m.group(3)

    def unstack(self, path: str) -> list[str] | None:
        """The per-layer checkpoint paths of a stacked model path, in the run's order (None for a
        path that is not stacked)."""
        where = self.run(path)
        if where is None:
            return None
        stack, r, name = where
        return [f"{stack.per_layer}.{i}.{name}" for i in stack.runs[r]]

    def locate(self, path: str) -> tuple[str, int] | None:
        """(stacked model path, index in the run) of a per-layer checkpoint path, None for a path
        that is not per-layer, CheckpointError for a layer the model does not have."""
        m = self._layer.match(path)
        if m is None:
            return None
        stack = self._by_layer[m.group(1)]
        i, where = int(m.group(2)), self.run_of[stack.per_layer]
        if i not in where:
            raise CheckpointError(f"parameter {path}: the model has {len(where)} {stack.unit}s")
        r, j = where[i]
        return f"{stack.stacked}.{r}.{m.group(3)}", j


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


def checkpoint_view(flat: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """{checkpoint path: value}: the model's flat parameters with every stacked one replaced by
    its layers (`take_layer`); a stack's layers come in layer order (each layer's parameters in
    the model's order) where its first stacked parameter appears."""
    layout = Layout(config)
    order: list[tuple[str, Any] | int] = []  # an int: the place of that stack's layers
    layers: dict[int, list[tuple[int, int, str, Any]]] = {}  # (layer, place, path, value)
    for q, (path, value) in enumerate(flat.items()):
        where = layout.run(path)
        if where is None:
            order.append((path, value))
            continue
        stack, r, _ = where
        s = layout.stacks.index(stack)
        if s not in layers:
            order.append(s)
            layers[s] = []
        layers[s] += [
            (i, q, name, take_layer(value, j))
            for j, (i, name) in enumerate(zip(stack.runs[r], layout.unstack(path)))
        ]
    out: dict[str, Any] = {}
    for item in order:
        if isinstance(item, int):
            entries = sorted(layers[item], key=lambda e: e[:2])
            out.update((name, value) for _, _, name, value in entries)
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

    def __init__(self, targets: Mapping[str, jax.ShapeDtypeStruct], config: ModelConfig):
        self.targets, self.layout = targets, Layout(config)
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
                stack, r, _ = self.layout.run(path)
                name = self.layout.unstack(path)[missing]
                raise CheckpointError(
                    f"checkpoint lacks parameter {name} ({stack.unit} {stack.runs[r][missing]})"
                )
        return self.values


__all__ = [
    "Layout",
    "LayerSlice",
    "Stack",
    "Stacker",
    "checkpoint_view",
    "layer_sharding",
    "materialize",
]
