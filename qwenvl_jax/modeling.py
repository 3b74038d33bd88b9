"""Building models: random init, abstract (shapes only), or loaded from a checkpoint, sharded on a
mesh from the start.

Loading reads one tensor at a time and places it straight into its sharded array
(`jax.make_array_from_callback`), so the checkpoint is never held twice in host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from qwenvl_jax.config import ModelConfig, load_config
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.sharding import abstract_params, state_shardings

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(d: Any) -> Any:
    if isinstance(d, str):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r} (use one of {sorted(DTYPES)})")
        return DTYPES[d]
    return d


def model_class(family: str) -> type:
    if family == "qwen_vl":
        from qwenvl_jax.models.qwen_vl_v1 import QwenVLV1ForCausalLM

        return QwenVLV1ForCausalLM
    from qwenvl_jax.models.qwen_vl import QwenVLForConditionalGeneration

    return QwenVLForConditionalGeneration


def _maker(config: ModelConfig, dtype, param_dtype, seed: int) -> Callable[[], nnx.Module]:
    cls = model_class(config.family)
    return lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _default_mesh() -> Mesh:
    from qwenvl_jax.sharding import make_mesh

    return make_mesh(data=1, fsdp=1, tensor=1, expert=1, devices=jax.devices()[:1])


def build_model(
    config: ModelConfig,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    seed: int = 0,
    abstract: bool = False,
) -> nnx.Module:
    """A randomly initialised model (or, with abstract=True, one with ShapeDtypeStruct leaves that
    carry their NamedSharding), created directly with the sharding the rules give on `mesh`."""
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    make = _maker(config, dtype, param_dtype, seed)
    with abstract_params():
        abs_model = make()
    graphdef, abs_state = nnx.split(abs_model)
    shardings = state_shardings(abs_state, mesh or _default_mesh())
    if abstract:
        state = jax.tree.map(
            lambda v, s: v.replace(
                jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_raw_value())
            ),
            abs_state,
            shardings,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return nnx.merge(graphdef, state)

    init = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def param_count(model: nnx.Module) -> int:
    """Number of parameters, for concrete and abstract models alike."""
    state = nnx.state(model, nnx.Param)
    return int(sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)))


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def params_as_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Flat {checkpoint path: host array} of every parameter, one entry per decoder layer as in
    checkpoints (gathered; use for small models)."""
    from qwenvl_jax.loading.stacking import checkpoint_view

    state = nnx.state(model, nnx.Param)
    flat = {path_str(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(state)}
    return checkpoint_view(flat, model.config.text)


def load_hf_weights(
    abs_model: nnx.Module, reader, mapping, *, dtype: Any, progress: bool = False
) -> nnx.Module:
    """Fill an abstract (sharded) model from a checkpoint reader, one tensor at a time.

    Every checkpoint key must map to a parameter and every parameter must be filled; the error
    names the first key or parameter that does not. Decoder layers are written into their
    stacked arrays in place (`loading.stacking.Stacker`).
    """
    from qwenvl_jax.loading.stacking import Stacker, checkpoint_view

    graphdef, abs_state = nnx.split(abs_model)
    model_flat = {path_str(p): v.get_raw_value() for p, v in nnx.to_flat_state(abs_state)}
    flat = checkpoint_view(model_flat, abs_model.config.text)
    stacker = Stacker(model_flat, abs_model.config.text)
    values: set[str] = set()
    tied = getattr(abs_model.config.text, "tie_word_embeddings", False)
    keys = list(reader.keys())
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="loading", unit="tensor")
    for key in it:
        if mapping.is_ignored(key):
            continue
        if tied and key == "lm_head.weight":
            continue  # some exports store the tied head anyway
        array = reader.get(key)

        def target_shape(path: str, key=key) -> tuple:
            if path not in flat:
                raise CheckpointError(f"checkpoint key {key!r} maps to unknown parameter {path}")
            return tuple(flat[path].shape)

        for path, a in mapping.import_tensor(key, array, target_shape):
            var = flat.get(path)
            if var is None:
                raise CheckpointError(f"checkpoint key {key!r} maps to unknown parameter {path}")
            if tuple(a.shape) != tuple(var.shape):
                raise CheckpointError(
                    f"checkpoint tensor {key!r} has shape {tuple(a.shape)}, parameter {path} "
                    f"expects {tuple(var.shape)}"
                )
            if path in values:
                raise CheckpointError(f"parameter {path} is written twice (last by {key!r})")
            values.add(path)
            stacker.put(path, _place(a, var, dtype))
        del array
    missing = sorted(set(flat) - values)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first: {missing[0]}")
    placed = stacker.result()
    state = nnx.from_flat_state(
        [(p, v.replace(placed[path_str(p)])) for p, v in nnx.to_flat_state(abs_state)]
    )
    return nnx.merge(graphdef, state)


def _place(a: np.ndarray, target: jax.ShapeDtypeStruct, dtype: Any) -> jax.Array:
    """One host tensor -> a device array with the target's sharding and dtype."""
    dtype = jnp.dtype(target.dtype if dtype is None else dtype)
    a = np.asarray(a)
    if a.dtype != dtype:
        a = a.astype(dtype)
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        sharding = SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, NamedSharding) and sharding.spec == PartitionSpec():
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def from_pretrained(
    path: str | Path,
    dtype: Any = "bfloat16",
    mesh: Mesh | None = None,
    *,
    abstract: bool = False,
    param_dtype: Any = None,
    progress: bool = False,
) -> nnx.Module:
    """A model from a Hugging Face checkpoint folder or a `qwenvl-jax convert` folder (see
    INTERFACE.md). abstract=True reads config.json alone."""
    config = load_config(path)
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    if abstract:
        return build_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True)
    folder = Path(path)
    from qwenvl_jax.loading import orbax_io
    from qwenvl_jax.models.mtp import fit_mtp

    if orbax_io.is_orbax_folder(folder):
        config = fit_mtp(config, orbax_io.stored_params(folder))
        abs_model = build_model(
            config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True
        )
        return orbax_io.restore_model(folder, abs_model)
    from qwenvl_jax.loading.convert import open_weights, read_hf_config
    from qwenvl_jax.loading.mapping import mapping_for

    # FP8 weights are dequantised on read (then cast to the parameter dtype), experts fused.
    reader = open_weights(folder, read_hf_config(folder), "float32")
    try:
        config = fit_mtp(config, reader.keys())
        abs_model = build_model(
            config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True
        )
        return load_hf_weights(
            abs_model, reader, mapping_for(config), dtype=param_dtype, progress=progress
        )
    finally:
        close = getattr(reader, "close", None)
        if close:
            close()
