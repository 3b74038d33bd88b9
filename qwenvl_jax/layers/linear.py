"""Linear and embedding layers whose weights carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.sharding import normal, param, target_platform, zeros


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x float[..., K] @ w float[K, N]. Traced for CPU, one 2-D product over the leading
    dimensions merged: XLA:CPU lays out the gradients of a 3-D product ([B, T, K]) with a
    transpose of the activations fused into their elementwise producers, which ran far slower
    than the 2-D form's (a gated MLP's forward and backward at 4 x 512 tokens, width 1024 ->
    3072: 821 ms 3-D, 626 ms 2-D). Other platforms get the product as written. The choice is
    made while tracing (`jax.lax.platform_dependent` here made a two-process CPU run hang on
    its first step when that step came from a warm compilation cache)."""
    if x.ndim < 3 or target_platform() != "cpu":
        return jnp.dot(x, w)
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


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
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
        return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
