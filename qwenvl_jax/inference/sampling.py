"""Choosing the next token from logits, inside the jitted prefill and decode steps.

The order of Hugging Face's logits processors: first the repetition penalty (the logit of every
token id the sequence holds so far, prompt included, is divided by the penalty when positive and
multiplied by it when negative), then greedy argmax, or sampling: divide by the temperature, keep
the `top_k` most likely tokens, keep the smallest set of most likely tokens whose probability
reaches `top_p`, then draw from the softmax. The values are traced (changing them does not
recompile); which steps are on is static (`SamplingMode`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingMode(NamedTuple):
    """The static part of the sampling settings: one compiled program per distinct mode."""

    greedy: bool
    top_k: bool
    top_p: bool
    penalty: bool = False

    @classmethod
    def of(
        cls, temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0
    ) -> SamplingMode:
        greedy = temperature <= 0.0
        return cls(
            greedy, not greedy and top_k > 0, not greedy and top_p < 1.0, repetition_penalty != 1.0
        )


def mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """seen bool[B, V] with the ids tokens int[B, T] (or int[B]) of each row set, those where
    valid bool (tokens' shape) is False left out."""
    B, V = seen.shape
    tokens = tokens.reshape(B, -1)
    if valid is not None:
        tokens = jnp.where(valid.reshape(B, -1), tokens, V)  # out of range: dropped
    return seen.at[jnp.arange(B)[:, None], tokens].set(True, mode="drop")


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """float32[B, V]: the logits of the seen bool[B, V] ids divided by penalty float[] where
    positive, multiplied by it where negative (Hugging Face's RepetitionPenaltyLogitsProcessor)."""
    x = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(x < 0, x * penalty, x / penalty), x)


def filter_logits(
    logits: jax.Array,
    mode: SamplingMode,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """The logits to draw from, float32[B, V]: divided by the temperature, with the tokens that
    top_k / top_p remove set to the lowest float. temperature float[]; top_k int[] (0 = off);
    top_p float[] (1 = off)."""
    x = logits.astype(jnp.float32) / temperature
    low = jnp.finfo(jnp.float32).min
    if not (mode.top_k or mode.top_p):
        return x
    ordered = jnp.sort(x, axis=-1)[:, ::-1]  # descending
    if mode.top_k:
        k = jnp.clip(top_k, 1, x.shape[-1])
        kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1, keepdims=True)
        x = jnp.where(x < kth, low, x)
        ordered = jnp.where(jnp.arange(x.shape[-1]) < k, ordered, low)
    if mode.top_p:
        probs = jax.nn.softmax(ordered, axis=-1)
        better = jnp.cumsum(probs, axis=-1) - probs  # the mass of the more likely tokens
        keep = (better < top_p).at[:, 0].set(True)
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, low, x)
    return x


def sample(
    logits: jax.Array,
    key: jax.Array,
    mode: SamplingMode,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    penalty: jax.Array | None = None,
    seen: jax.Array | None = None,
) -> jax.Array:
    """logits float[B, V] -> token ids int32[B]: with mode.penalty first `penalize`d by penalty
    float[] over seen bool[B, V]; then argmax when greedy, else a draw from `filter_logits` with
    the PRNG key."""
    if mode.penalty:
        logits = penalize(logits, seen, penalty)
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, mode, temperature, top_k, top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
