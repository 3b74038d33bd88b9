"""Feed-forward blocks: gated (SwiGLU) and plain two-layer MLPs, and the activation table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.layers.linear import Linear

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str = "silu",
        bias: bool = False,
        axes=("embed", "mlp"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.gate_proj = Linear(dim, hidden, axes=axes, **kw)
        self.up_proj = Linear(dim, hidden, axes=axes, **kw)
        self.down_proj = Linear(hidden, dim, axes=axes[::-1], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
    """fc2(act(fc1(x)))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        out: int | None = None,
        *,
        act: str,
        bias: bool = True,
        axes=("vit_embed", "vit_mlp"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.fc1 = Linear(dim, hidden, axes=axes, **kw)
        self.fc2 = Linear(hidden, out or dim, axes=axes[::-1], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))
