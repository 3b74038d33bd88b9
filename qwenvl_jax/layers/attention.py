"""The one attention function: segment ids, causal or not, grouped-query heads.

Segment ids express every mask the project needs: padding (id 0 attends to nothing and is attended
by nothing), packed samples and the per-image / per-frame / per-window blocks of the ViT
(attention only within equal ids), so no dense mask across images is ever built.

Short sequences take one dense pass. Long ones are cut into query and key blocks and computed
with an online softmax (flash-attention style), visiting only the key blocks whose segment-id range
meets the query block's (and, when causal, that are not wholly in its future): the cost of a ViT
over many images, or of packed training rows, grows with the images' or samples' own lengths, not
with the square of the whole sequence. Segment ids must be non-decreasing along the sequence apart
from zeros (padding), which holds for every layout the project builds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENSE_MAX = 1024  # query and key lengths up to this take the single dense pass
BLOCK = 512


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
    block: int | None = None,
    dense_max: int | None = None,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v.

    q: float[B, T, H, D]; k, v: float[B, S, K, D] with H a multiple of K (GQA).
    q_segment_ids: int[B, T]; kv_segment_ids: int[B, S]; a query attends a key iff their segment
    ids are equal and non-zero and, when `causal`, kv_positions <= q_positions (slot indices
    int[B, T] and int[B, S], default arange). Returns float[B, T, H, D]; a query that may attend
    nothing (padding) gets an arbitrary finite output.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    block = BLOCK if block is None else block
    dense_max = DENSE_MAX if dense_max is None else dense_max
    if causal:
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        if kv_positions is None:
            kv_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    else:
        q_positions = jnp.zeros((B, T), jnp.int32)
        kv_positions = jnp.zeros((B, S), jnp.int32)
    qg = q.reshape(B, T, K, H // K, D)
    args = (qg, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale)
    if max(T, S) <= dense_max:
        out = _dense(*args, softmax_in_fp32)
    else:
        out = _blocked(*args, block)
    return out.reshape(B, T, H, D)


def _mask(qseg, kseg, qpos, kpos, causal):
    """bool[B, t, s]."""
    mask = (qseg[:, :, None] == kseg[:, None, :]) & (qseg[:, :, None] != 0)
    if causal:
        mask &= kpos[:, None, :] <= qpos[:, :, None]
    return mask


def _dense(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, softmax_in_fp32):
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(scale, qg.dtype)
    if softmax_in_fp32:
        scores = scores.astype(jnp.float32)
    mask = _mask(qseg, kseg, qpos, kpos, causal)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _blocks(x: jax.Array, n: int, size: int, fill=0) -> jax.Array:
    """[B, L, ...] -> [n, B, size, ...], padded at the end with `fill`."""
    pad = n * size - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _ranges(seg: jax.Array, pos: jax.Array):
    """Per block and row: the smallest and largest non-zero segment id, the positions' range.
    seg, pos: int[n, B, b] -> four int[n, B]."""
    big = jnp.iinfo(jnp.int32).max
    live = seg != 0
    lo = jnp.min(jnp.where(live, seg, big), axis=-1)
    hi = jnp.max(jnp.where(live, seg, 0), axis=-1)
    plo = jnp.min(jnp.where(live, pos, big), axis=-1)
    phi = jnp.max(jnp.where(live, pos, -1), axis=-1)
    return lo, hi, plo, phi


def _blocked(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block):
    B, T, K, G, D = qg.shape
    S = k.shape[1]
    bq, bk = min(block, T), min(block, S)
    nq, nk = -(-T // bq), -(-S // bk)
    qb, kb, vb = _blocks(qg, nq, bq), _blocks(k, nk, bk), _blocks(v, nk, bk)
    qsb, ksb = _blocks(qseg.astype(jnp.int32), nq, bq), _blocks(kseg.astype(jnp.int32), nk, bk)
    qpb, kpb = _blocks(qpos.astype(jnp.int32), nq, bq), _blocks(kpos.astype(jnp.int32), nk, bk)
    q_lo, q_hi, qp_lo, qp_hi = _ranges(qsb, qpb)
    k_lo, k_hi, kp_lo, kp_hi = _ranges(ksb, kpb)
    # meets[i, j]: some row has a query of block i and a key of block j that may attend
    meets = (q_lo[:, None] <= k_hi[None]) & (k_lo[None] <= q_hi[:, None])
    if causal:
        meets &= kp_lo[None] <= qp_hi[:, None]
    meets = jnp.any(meets, axis=-1)  # [nq, nk]
    scale = jnp.asarray(scale, jnp.float32)

    def q_block(i):
        q_i, qs_i, qp_i = qb[i], qsb[i], qpb[i]

        def visit(j, carry):
            m, l, acc = carry
            s = jnp.einsum("btkgd,bskd->bkgts", q_i, kb[j]).astype(jnp.float32) * scale
            mask = _mask(qs_i, ksb[j], qp_i, kpb[j], causal)[:, None, None]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb[j]).astype(jnp.float32)
            return m_new, l, acc * alpha[..., None] + pv

        def step(j, carry):
            return jax.lax.cond(meets[i, j], visit, lambda _, c: c, j, carry)

        init = (
            jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, D), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(0, nk, step, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
        return jnp.moveaxis(out, 3, 1).astype(qg.dtype)  # [B, bq, K, G, D]

    out = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, bq, K, G, D]
    return jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, K, G, D)[:, :T]
