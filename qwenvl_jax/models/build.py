"""Building a model of a config: random init or abstract (shapes and shardings only), sharded on
a mesh from the start. Loading weights into one is `loading.load`; `modeling.from_pretrained`
joins the two."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.sharding import abstract_params, state_shardings

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


@functools.lru_cache(maxsize=16)
def _initializer(config: ModelConfig, dtype, param_dtype, mesh: Mesh):
    """(graphdef, abstract state, shardings, the jitted init of a random key). The key is an
    argument rather than a constant, so one compiled init serves every seed: compiling a model's
    init costs seconds even for the tiny presets, and tests build many of them."""
    cls = model_class(config.family)

    def make(key: jax.Array) -> nnx.Module:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))

    with abstract_params():
        abs_model = make(jax.random.key(0))
    graphdef, abs_state = nnx.split(abs_model)
    shardings = state_shardings(abs_state, mesh)
    init = jax.jit(lambda key: nnx.state(make(key)), out_shardings=shardings)
    return graphdef, abs_state, shardings, init


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
    graphdef, abs_state, shardings, init = _initializer(
        config, dtype, param_dtype, mesh or _default_mesh()
    )
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
    # nnx.Rngs(seed) starts from jax.random.key(seed): the same weights as a constant seed
    return nnx.merge(graphdef, init(jax.random.key(seed)))
