"""Rotary position embeddings: one mechanism for 1-D RoPE, chunked and interleaved M-RoPE and the
2-D RoPE of the ViTs.

Each rotary frequency j reads the position of one axis, `axis_of_freq[j]`: all zeros for 1-D RoPE;
t/h/w chunks for Qwen2/2.5 M-RoPE (mrope_section [16, 24, 24]); THWTHW...TTTT for Qwen3; h then w
halves for the vision towers. Angles are computed in float32; `cat(angles, angles)` is applied with
rotate-half.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(arange(0, dim, 2) / dim), float32[dim // 2] (computed in float64, rounded)."""
    return (1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(
        np.float32
    )


def mrope_axes(section: tuple[int, ...], interleaved: bool) -> np.ndarray:
    """The position axis (0=t, 1=h, 2=w) each of the sum(section) frequencies reads."""
    n = int(sum(section))
    if not interleaved:
        return np.repeat(np.arange(len(section)), section).astype(np.int32)
    axes = np.zeros(n, np.int32)
    for axis in (1, 2):
        idx = np.arange(axis, 3 * section[axis], 3)
        axes[idx[idx < n]] = axis
    return axes


def rope_angles(positions: jax.Array, freqs: np.ndarray, axis_of_freq: np.ndarray) -> jax.Array:
    """positions: int[A, ...] (one row per axis); returns float32[..., F] = pos[axis_of_freq[j]] *
    freqs[j]."""
    pos = jnp.asarray(positions).astype(jnp.float32)
    sel = jnp.take(pos, jnp.asarray(axis_of_freq), axis=0)  # [F, ...]
    return jnp.moveaxis(sel, 0, -1) * jnp.asarray(freqs, jnp.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array, *, in_fp32: bool) -> jax.Array:
    """x: float[B, T, H, D]; angles: float32[B, T, R/2] with R <= D: the first R dimensions of each
    head rotate (partial rotary, Qwen3.5), the rest pass through. `in_fp32` rotates in float32 and
    casts back (the ViTs, Qwen-VL v1); otherwise cos/sin are cast to x.dtype first (the Qwen2/3
    decoders)."""
    rot = 2 * angles.shape[-1]
    if rot < x.shape[-1]:
        rotated = apply_rope(x[..., :rot], angles, in_fp32=in_fp32)
        return jnp.concatenate([rotated, x[..., rot:]], axis=-1)
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if in_fp32:
        xf = x.astype(jnp.float32)
        return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
