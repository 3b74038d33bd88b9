"""RMSNorm and LayerNorm with the casting rules of the reference implementations."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.sharding import ones, param, zeros


class RMSNorm(nnx.Module):
    """`w * (x_f32 * rsqrt(mean(x^2) + eps)).astype(x.dtype)`: the cast comes before the weight.

    `zero_centered` (Qwen3.5): the weight is stored as w - 1 (initialised to zero) and the scale
    `(1 + w)` is applied in float32, before the cast."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axes=("norm",),
        param_dtype: Any = jnp.float32,
        zero_centered: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = param(rngs, zeros if zero_centered else ones, (dim,), param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.zero_centered:
            return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axes=("norm",),
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), param_dtype, axes)
        self.bias = param(rngs, zeros, (dim,), param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(kind: str, dim: int, **kw) -> RMSNorm | LayerNorm:
    return RMSNorm(dim, **kw) if kind == "rmsnorm" else LayerNorm(dim, **kw)
