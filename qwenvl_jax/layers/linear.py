"""Linear and embedding layers whose weights carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.sharding import normal, param, zeros


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel float[in, out] (the transpose of a torch Linear weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Sequence[str | None],
        bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
        std: float = 0.02,
    ):
        self.dtype = dtype
        self.kernel = param(rngs, normal(std), (in_features, out_features), param_dtype, axes)
        self.bias = param(rngs, zeros, (out_features,), param_dtype, axes[-1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table float[vocab, D]; `attend` gives tied output logits."""

    def __init__(
        self,
        num: int,
        features: int,
        *,
        axes=("vocab", "embed"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
        std: float = 0.02,
    ):
        self.dtype = dtype
        self.embedding = param(rngs, normal(std), (num, features), param_dtype, axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
