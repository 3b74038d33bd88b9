"""Sparse mixture of experts (Qwen3-VL-MoE): float32 router softmax, top-k, renormalised, with the
experts computed as grouped matmuls (`jax.lax.ragged_dot`) over tokens sorted by expert."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.mlp import ACTIVATIONS
from qwenvl_jax.sharding import normal, param


class SparseMoE(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        act: str = "silu",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.top_k = top_k
        self.num_experts = num_experts
        self.act = act
        self.dtype = dtype
        self.gate = Linear(
            dim,
            num_experts,
            axes=("embed", "router"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        # x @ W layout: gate_up float[E, D, 2I] (first I columns gate, last I up),
        # down float[E, I, D]
        self.gate_up_proj = param(
            rngs,
            normal(),
            (num_experts, dim, 2 * hidden),
            param_dtype,
            ("experts", "expert_embed", "expert_mlp"),
        )
        self.down_proj = param(
            rngs,
            normal(),
            (num_experts, hidden, dim),
            param_dtype,
            ("experts", "expert_mlp", "expert_embed"),
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: float[B, T, D] -> (float[B, T, D], router logits float[B*T, E])."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D).astype(self.dtype)
        logits = self.gate(flat)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [N, k]
        weights = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(logits.dtype)

        flat_experts = experts.reshape(-1)  # [N*k]
        order = jnp.argsort(flat_experts, stable=True)
        tokens = flat[order // self.top_k]  # [N*k, D], grouped by expert
        group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)
        h = jax.lax.ragged_dot(tokens, self.gate_up_proj[...].astype(self.dtype), group_sizes)
        gate, up = jnp.split(h, 2, axis=-1)
        h = ACTIVATIONS[self.act](gate) * up
        y = jax.lax.ragged_dot(h, self.down_proj[...].astype(self.dtype), group_sizes)
        y = jnp.zeros_like(y).at[order].set(y).reshape(B * T, self.top_k, D)
        out = jnp.sum(y * weights[..., None], axis=1)
        return out.reshape(B, T, D), logits


def load_balancing_loss(
    router_logits: jax.Array, top_k: int, valid: jax.Array | None = None
) -> jax.Array:
    """Switch-style auxiliary loss: E * sum_e (fraction of tokens routed to e) * (mean prob of e).

    router_logits: float[L, N, E] over the MoE layers; valid: bool[N] marks real (non-pad) tokens.
    """
    E = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, sel = jax.lax.top_k(probs, top_k)
    mask = jax.nn.one_hot(sel, E, dtype=jnp.float32)  # [L, N, k, E]
    w = jnp.ones(probs.shape[1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0) * probs.shape[0]
    tokens_per_expert = jnp.einsum("lnke,n->ke", mask, w) / denom
    prob_per_expert = jnp.einsum("lne,n->e", probs, w) / denom
    return jnp.sum(tokens_per_expert * prob_per_expert[None]) * E
