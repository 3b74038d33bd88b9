"""The one attention function: segment ids, causal or not, grouped-query heads.

Segment ids express every mask the project needs: padding (id 0 attends to nothing and is attended
by nothing), packed samples and the per-image / per-frame / per-window blocks of the ViT
(attention only within equal ids), so no dense mask across images is ever built by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    scale: float | None = None,
    softmax_in_fp32: bool = True,
    query_chunk: int = 2048,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v.

    q: float[B, T, H, D]; k, v: float[B, S, K, D] with H a multiple of K (GQA).
    q_segment_ids: int[B, T]; kv_segment_ids: int[B, S]; a query attends a key iff their segment
    ids are equal and non-zero and, when `causal`, kv_positions <= q_positions (slot indices
    int[B, T] and int[B, S], default arange). Long queries are processed `query_chunk` rows at a time so that
    the score matrix never holds more than query_chunk x S entries per head.
    Returns float[B, T, H, D].
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    if causal:
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        if kv_positions is None:
            kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    qg = q.reshape(B, T, K, G, D)

    def block(qb, qseg, qpos):
        scores = jnp.einsum("btkgd,bskd->bkgts", qb, k) * jnp.asarray(scale, qb.dtype)
        if softmax_in_fp32:
            scores = scores.astype(jnp.float32)
        mask = (qseg[:, :, None] == kv_segment_ids[:, None, :]) & (qseg[:, :, None] != 0)
        if causal:
            mask &= kv_positions[:, None, :] <= qpos[:, :, None]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, v)

    if query_chunk >= T:
        out = block(qg, q_segment_ids, q_positions)
    else:
        n = -(-T // query_chunk)
        pad = n * query_chunk - T
        qp = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        sp = jnp.pad(q_segment_ids, ((0, 0), (0, pad)))
        pp = (
            jnp.pad(q_positions, ((0, 0), (0, pad)))
            if causal
            else jnp.zeros((B, n * query_chunk), jnp.int32)
        )

        def chunk(i):
            sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * query_chunk, query_chunk, axis=1)
            return block(sl(qp), sl(sp), sl(pp))

        out = jax.lax.map(chunk, jnp.arange(n))  # [n, B, c, K, G, D]
        out = jnp.moveaxis(out, 0, 1).reshape(B, n * query_chunk, K, G, D)[:, :T]
    return out.reshape(B, T, H, D)
