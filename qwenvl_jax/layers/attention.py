"""The one attention function: segment ids, causal or not, grouped-query heads.

Segment ids express every mask the project needs: padding (id 0 attends to nothing and is attended
by nothing), packed samples and the per-image / per-frame / per-window blocks of the ViT
(attention only within equal ids), so no dense mask across images is ever built.

Short sequences take one dense pass. Long ones are cut into query and key blocks and computed
with an online softmax (flash-attention style), visiting only the key blocks whose segment-id range
meets the query block's (and, when causal, that are not wholly in its future): the cost of a ViT
over many images, or of packed training rows, grows with the images' or samples' own lengths, not
with the square of the whole sequence. The backward pass recomputes the visited score blocks from
the saved log-sum-exp, so training keeps no score block at all. Segment ids must be
non-decreasing along the sequence apart from zeros (padding), which holds for every layout the
project builds.

On TPU, self-attention over a whole sequence (training and prefill without a cache: default
positions, as many keys as queries) whose length the kernel's blocks divide runs JAX's splash
attention Pallas kernel (`splash_attention`) instead, chosen by the platform the step is compiled
for, so an ahead-of-time compile for a TPU topology from a CPU host gets the kernel too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from qwenvl_jax.sharding import map_shards

DENSE_MAX = 1024  # query and key lengths up to this take the single dense pass
BLOCK = 512
SPLASH_BLOCKS = (512, 256, 128)  # splash attention blocks, largest first (128-lane multiples)


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
    max_segment: int | None = None,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v.

    q: float[B, T, H, D]; k, v: float[B, S, K, D] with H a multiple of K (GQA).
    q_segment_ids: int[B, T]; kv_segment_ids: int[B, S]; a query attends a key iff their segment
    ids are equal and non-zero and, when `causal`, kv_positions <= q_positions (slot indices
    int[B, T] and int[B, S], default arange). Returns float[B, T, H, D]; a query that may attend
    nothing (padding) gets an arbitrary finite output.

    `max_segment`: the caller's promise that every segment is one contiguous run of at most this
    many positions (the ViT's windows), so no query attends a key `max_segment` or more positions
    away: the splash kernel then visits only the blocks near the diagonal (a static local mask;
    the segment ids still decide). The XLA path finds the blocks a segment meets by itself.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    splash_fits = (
        q_positions is None
        and kv_positions is None
        and T == S
        and softmax_in_fp32  # the kernel's softmax is float32
        and _splash_block(T) is not None
    )
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

    def xla(q, k, v, q_segment_ids, kv_segment_ids):
        qg = q.reshape(B, T, K, H // K, D)
        args = (qg, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale)
        if max(T, S) <= dense_max:
            out = _dense(*args, softmax_in_fp32)
        else:
            out = _blocked(*args, block)
        return out.reshape(B, T, H, D)

    operands = (q, k, v, q_segment_ids, kv_segment_ids)
    if not splash_fits:
        return xla(*operands)
    tpu = functools.partial(splash_attention, causal=causal, scale=scale, max_segment=max_segment)
    return jax.lax.platform_dependent(*operands, tpu=tpu, default=xla)


def _splash_block(length: int) -> int | None:
    """splash attention's block for a sequence of `length`: the largest of SPLASH_BLOCKS that
    divides it, None if none does (the kernel needs whole blocks of 128-lane multiples)."""
    return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    scale: float,
    block: int | None = None,
    interpret: bool = False,
    max_segment: int | None = None,
) -> jax.Array:
    """`dot_product_attention` of a whole sequence (default positions, T == S) by JAX's splash
    attention TPU kernel (its own custom VJP for the gradients); `interpret` runs it in Pallas
    interpret mode (any backend). Shapes as there; `block` (default: the largest of SPLASH_BLOCKS
    dividing T) must divide T.

    The kernel attends within equal segment ids, so padding (id 0) attends padding where the
    other path attends nothing: the outputs at live queries, and every gradient when the
    padding's outputs get no gradient (as when the loss ignores them), are the same. The scale
    is applied to q (the kernel takes it pre-scaled). Under a mesh each device runs the kernel
    on its rows (split as the batch) and heads; key/value heads split with the query heads, so
    that each device keeps its query heads' groups.
    """
    heads = ("batch", None, "act_heads", None)
    run = map_shards(
        functools.partial(
            _splash,
            causal=causal,
            scale=scale,
            block=block,
            interpret=interpret,
            max_segment=max_segment,
        ),
        in_axes=(heads, heads, heads, ("batch", None), ("batch", None)),
        out_axes=heads,
    )
    return run(q, k, v, q_segment_ids, kv_segment_ids)


def _splash(
    q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, block, interpret, max_segment
):
    """`splash_attention` on one device."""
    B, T, H, D = q.shape
    local = max_segment is not None and max_segment < T
    if block is None:  # a local mask visits fewer positions in smaller blocks
        block = min(b for b in SPLASH_BLOCKS if T % b == 0) if local else _splash_block(T)
    if local:  # keys within max_segment - 1 positions
        reach = max_segment - 1
        mask = splash_mask.LocalMask((T, T), (reach, 0 if causal else reach), offset=0)
    elif causal:
        mask = splash_mask.CausalMask((T, T))
    else:
        mask = splash_mask.FullMask((T, T))
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * H),
        block_sizes=splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )  # grouped-query heads: query head h reads key/value head h // (H / K)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, heads, T, D]
    segments = splash.SegmentIds(q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    out = jax.vmap(kernel)(
        heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), segments
    )
    return heads_first(out)


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


class _Tiles(NamedTuple):
    """The blocked view of one attention call: q/k/v, segment ids and positions cut into blocks
    ([n, B, size, ...]), and which (query block, key block) pairs may attend at all."""

    qb: jax.Array
    kb: jax.Array
    vb: jax.Array
    qsb: jax.Array
    ksb: jax.Array
    qpb: jax.Array
    kpb: jax.Array
    meets: jax.Array  # bool[nq, nk]


def _tiles(qg, k, v, qseg, kseg, qpos, kpos, causal, block) -> _Tiles:
    T, S = qg.shape[1], k.shape[1]
    bq, bk = min(block, T), min(block, S)
    nq, nk = -(-T // bq), -(-S // bk)
    qsb, ksb = _blocks(qseg.astype(jnp.int32), nq, bq), _blocks(kseg.astype(jnp.int32), nk, bk)
    qpb, kpb = _blocks(qpos.astype(jnp.int32), nq, bq), _blocks(kpos.astype(jnp.int32), nk, bk)
    q_lo, q_hi, qp_lo, qp_hi = _ranges(qsb, qpb)
    k_lo, k_hi, kp_lo, kp_hi = _ranges(ksb, kpb)
    # meets[i, j]: some row has a query of block i and a key of block j that may attend
    meets = (q_lo[:, None] <= k_hi[None]) & (k_lo[None] <= q_hi[:, None])
    if causal:
        meets &= kp_lo[None] <= qp_hi[:, None]
    meets = jnp.any(meets, axis=-1)  # [nq, nk]
    return _Tiles(
        _blocks(qg, nq, bq), _blocks(k, nk, bk), _blocks(v, nk, bk), qsb, ksb, qpb, kpb, meets
    )


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """[n, B, size, ...] -> [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _blocked_forward(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block):
    """(out float[B, T, K, G, D], log-sum-exp float32[B, T, K, G]; +inf where a query attends
    nothing) by an online softmax over the key blocks that meet each query block."""
    B, T, K, G, D = qg.shape
    t = _tiles(qg, k, v, qseg, kseg, qpos, kpos, causal, block)
    bq = t.qb.shape[2]
    scale = jnp.asarray(scale, jnp.float32)

    def q_block(i):
        q_i, qs_i, qp_i = t.qb[i], t.qsb[i], t.qpb[i]

        def visit(j, carry):
            m, l, acc = carry
            s = jnp.einsum("btkgd,bskd->bkgts", q_i, t.kb[j]).astype(jnp.float32) * scale
            mask = _mask(qs_i, t.ksb[j], qp_i, t.kpb[j], causal)[:, None, None]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(t.vb.dtype), t.vb[j])
            return m_new, l, acc * alpha[..., None] + pv.astype(jnp.float32)

        def step(j, carry):
            return jax.lax.cond(t.meets[i, j], visit, lambda _, c: c, j, carry)

        init = (
            jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, D), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(0, t.kb.shape[0], step, init)
        live = l > 0
        out = jnp.where(live[..., None], acc / jnp.where(live, l, 1.0)[..., None], 0.0)
        lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), jnp.inf)
        return jnp.moveaxis(out, 3, 1).astype(qg.dtype), jnp.moveaxis(lse, 3, 1)

    out, lse = jax.lax.map(q_block, jnp.arange(t.qb.shape[0]))
    return _unblock(out, T), _unblock(lse, T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _blocked(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block):
    """Blocked attention whose backward recomputes each visited score block from the saved
    log-sum-exp (flash-attention style): its memory is that of q, k and v, not of the scores."""
    return _blocked_forward(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block)[0]


def _blocked_fwd(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block):
    out, lse = _blocked_forward(qg, k, v, qseg, kseg, qpos, kpos, causal, scale, block)
    return out, (qg, k, v, qseg, kseg, qpos, kpos, out, lse)


def _blocked_bwd(causal, scale, block, res, dout):
    qg, k, v, qseg, kseg, qpos, kpos, out, lse = res
    B, T, K, G, D = qg.shape
    S = k.shape[1]
    t = _tiles(qg, k, v, qseg, kseg, qpos, kpos, causal, block)
    nq, bq = t.qb.shape[:3:2]
    f32 = jnp.float32
    dob = _blocks(dout, nq, bq)
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [B, T, K, G]
    deltab = jnp.moveaxis(_blocks(delta, nq, bq), 2, -1)  # [nq, B, K, G, bq]
    lseb = jnp.moveaxis(_blocks(lse, nq, bq, fill=jnp.inf), 2, -1)
    scale = jnp.asarray(scale, f32)

    def k_block(dq, j):
        k_j, v_j = t.kb[j], t.vb[j]

        def visit(i, carry):
            dq, dk, dv = carry
            q_i, do_i = t.qb[i], dob[i]
            s = jnp.einsum("btkgd,bskd->bkgts", q_i, k_j, preferred_element_type=f32) * scale
            mask = _mask(t.qsb[i], t.ksb[j], t.qpb[i], t.kpb[j], causal)[:, None, None]
            p = jnp.where(mask, jnp.exp(s - lseb[i][..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bkgts,btkgd->bskd", p.astype(v.dtype), do_i, preferred_element_type=f32
            )
            dp = jnp.einsum("btkgd,bskd->bkgts", do_i, v_j, preferred_element_type=f32)
            ds = (p * (dp - deltab[i][..., None]) * scale).astype(qg.dtype)
            dq_i = jnp.einsum("bkgts,bskd->btkgd", ds, k_j, preferred_element_type=f32)
            dq = dq.at[i].add(dq_i)
            dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, q_i, preferred_element_type=f32)
            return dq, dk, dv

        def step(i, carry):
            return jax.lax.cond(t.meets[i, j], visit, lambda _, c: c, i, carry)

        zeros = jnp.zeros(k_j.shape, f32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(t.qb.shape, f32)
    dq, (dk, dv) = jax.lax.scan(k_block, dq0, jnp.arange(t.kb.shape[0]))
    dq = _unblock(dq, T).astype(qg.dtype)
    return dq, _unblock(dk, S).astype(k.dtype), _unblock(dv, S).astype(v.dtype), *(None,) * 4


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
