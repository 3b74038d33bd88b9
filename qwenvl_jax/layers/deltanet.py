"""Gated DeltaNet, the linear-attention layer of Qwen3.5: the gated delta rule and its layer.

Per value head the layer keeps a float32 state S[d_k, d_v] and, token by token,

    S <- exp(g) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T q

with q and k L2-normalised and q scaled by d_k^-0.5. Two forms compute it from one preparation
(`_prepare`): the chunked form (chunks of 64 tokens, a unit-lower-triangular inverse within a chunk,
a `jax.lax.scan` of the state across chunks) for prefill and training, and the recurrent form (a
scan over tokens) for decoding. Both take and return the state, so a prefill continues into decode.

Segment ids int[B, T] (0 = padding, 1, 2, ... = packed samples, non-decreasing apart from zeros)
make padding invisible: a padding position neither decays nor writes the state and the causal
conv1d skips it, so a left-padded row equals the row alone. A passed-in state (recurrent and conv)
continues into the first segment of a call; every later segment of the row starts from zero.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.layers import deltanet_tpu
from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.sharding import ones, param, shard

CHUNK = 64
L2NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- the delta rule


def _l2norm(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def _regions(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Which stretch of the state each position belongs to: int[B, T] and the initial state's
    int[B]. A segment's id once it has begun (padding keeps the id before it); the first segment,
    and anything before it, share the initial state's region."""
    seg = segment_ids.astype(jnp.int32)
    live = seg != 0
    first = jnp.min(jnp.where(live, seg, jnp.iinfo(jnp.int32).max), axis=1)
    first = jnp.where(jnp.any(live, axis=1), first, 0)
    region = jnp.maximum(jax.lax.cummax(seg, axis=1), first[:, None])
    return region, first


def _prepare(q, k, v, g, beta, segment_ids):
    """float32 inputs of either form: q, k L2-normalised and repeated to the value heads, q scaled;
    q, g and beta zero at padding (no read, no decay, no write). Returns q, k float[B, T, H, d_k],
    v float[B, T, H, d_v], g, beta float[B, T, H], region int[B, T], initial region int[B]."""
    H, Hk = v.shape[2], k.shape[2]
    if H % Hk:
        raise ValueError(f"value heads ({H}) must be a multiple of key heads ({Hk})")
    f32 = jnp.float32
    q, k = _l2norm(q.astype(f32)), _l2norm(k.astype(f32))
    if Hk != H:  # each key head serves H // Hk consecutive value heads
        q, k = jnp.repeat(q, H // Hk, axis=2), jnp.repeat(k, H // Hk, axis=2)
    live = (segment_ids != 0)[:, :, None]
    q = jnp.where(live[..., None], q * (q.shape[-1] ** -0.5), 0.0)  # padding reads nothing
    g = jnp.where(live, g.astype(f32), 0.0)
    beta = jnp.where(live, beta.astype(f32), 0.0)
    region, first = _regions(segment_ids)
    return q, k, v.astype(f32), g, beta, region, first


@jax.custom_vjp
def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + strictly_lower(a))^-1 for float[..., C, C], by forward substitution a row at a time.

    Not `lax.linalg.triangular_solve`: on XLA:CPU its LAPACK kernel waits on the intra-op thread
    pool from inside that pool, so two solves running at once (a training step's forward and
    backward chunks) deadlock a 2-core machine. Not repeated squaring (sum of powers) either: with
    slowly decaying, correlated keys the powers grow and cancel, and float32 loses every digit.
    """
    return _inverse_rows(a)


def _inverse_rows(a: jax.Array) -> jax.Array:
    C = a.shape[-1]
    lower = jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), a, 0.0)

    def row(i, x):  # x[i] = e_i - sum_{j<i} a[i, j] x[j]; rows j < i are final
        ai = jax.lax.dynamic_index_in_dim(lower, i, axis=-2, keepdims=True)  # [..., 1, C]
        xi = jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(x, xi - ai @ x, i, axis=-2)

    eye = jnp.broadcast_to(jnp.eye(C, dtype=a.dtype), a.shape)
    return jax.lax.fori_loop(1, C, row, eye)


def _inverse_fwd(a):
    x = _inverse_rows(a)
    return x, x


def _inverse_bwd(x, dx):
    # d(X) = -X d(L) X, so dL = -X^T dX X^T, only where L has entries (strictly below the diagonal)
    xt = jnp.swapaxes(x, -1, -2)
    da = -(xt @ dx @ xt)
    C = x.shape[-1]
    return (jnp.where(jnp.tril(jnp.ones((C, C), bool), -1), da, 0.0),)


_unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _initial(state: jax.Array | None, k: jax.Array, v: jax.Array) -> jax.Array:
    if state is not None:
        return state.astype(jnp.float32)
    return jnp.zeros((k.shape[0], v.shape[2], k.shape[3], v.shape[3]), jnp.float32)


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array,
    initial_state: jax.Array | None = None,
    chunk_size: int = CHUNK,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule over whole chunks (prefill, training).

    q, k: float[B, T, Hk, d_k]; v: float[B, T, H, d_v] (H a multiple of Hk); g (log decay, <= 0),
    beta: float[B, T, H]; segment_ids: int[B, T]; initial_state: float32[B, H, d_k, d_v] or None
    (zeros). Returns o float[B, T, H, d_v] in q's dtype (zero at padding) and the final state.
    On TPU the recurrence across chunks is a Pallas kernel (deltanet_tpu) where it tiles d_k, d_v
    and the chunk; `interpret` takes that kernel in Pallas interpret mode on any backend.
    """
    dtype = q.dtype
    q, k, v, g, beta, region, first = _prepare(q, k, v, g, beta, segment_ids)
    state = _initial(initial_state, k, v)
    B, T, H, dk = k.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...], zero-padded at the end
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    region = jnp.pad(region, [(0, 0), (0, pad)], mode="edge").reshape(B, 1, N, C)
    # the region of the state each chunk starts from: the previous chunk's last position's
    before = jnp.concatenate([first.reshape(B, 1, 1), region[:, :, :-1, -1]], axis=2)
    carried = region == before[..., None]  # [B, 1, N, C]: position i still reads that state
    last = region[..., -1:]  # [B, 1, N, 1]: the region the chunk's final state belongs to

    cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
    causal = jnp.tril(jnp.ones((C, C), bool))
    same = causal & (region[..., :, None] == region[..., None, :])  # [B, 1, N, C, C]
    # decay[i, j] = exp(cum_i - cum_j) for j <= i in one region (the exponent is <= 0), else 0
    decay = jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    from_state = jnp.where(carried, jnp.exp(cum), 0.0)  # decay of the initial state at i
    to_end = jnp.where(region == last, jnp.exp(cum[..., -1:] - cum), 0.0)  # decay of i to chunk end
    chunk_decay = jnp.where(carried[..., -1], jnp.exp(cum[..., -1]), 0.0)  # [B, H, N]

    k_beta = k * beta[..., None]
    # (I + strictly_lower(A)) [u | w] = [beta v | beta k exp(cum)]: the WY form of the chunk's
    # delta updates; the new values written at i are u_i - w_i S (S the chunk's initial state)
    a = jnp.einsum("bhnid,bhnjd->bhnij", k_beta, k) * decay
    rhs = jnp.concatenate([v * beta[..., None], k_beta * from_state[..., None]], axis=-1)
    uw = _unit_lower_inverse(a) @ rhs
    u, w = uw[..., : v.shape[-1]], uw[..., v.shape[-1] :]
    attn = jnp.einsum("bhnid,bhnjd->bhnij", q, k) * decay
    q_state = q * from_state[..., None]
    k_end = k * to_end[..., None]

    def step(s, xs):
        u, w, attn, q_state, k_end, chunk_decay = xs
        v_new = u - jnp.einsum("bhcd,bhde->bhce", w, s)
        o = jnp.einsum("bhcd,bhde->bhce", q_state, s) + jnp.einsum("bhij,bhje->bhie", attn, v_new)
        s = s * chunk_decay[..., None, None] + jnp.einsum("bhcd,bhce->bhde", k_end, v_new)
        return s, o

    def xla(state, *xs):
        state, o = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
        return jnp.moveaxis(o, 0, 2), state  # o: [B, H, N, C, d_v]

    # the cross-chunk recurrence: a Pallas kernel on TPU where it tiles the sizes
    operands = (state, u, w, attn, q_state, k_end, chunk_decay)
    if not deltanet_tpu.fits(dk, v.shape[-1], C):
        o, state = xla(*operands)
    elif interpret:
        o, state = deltanet_tpu.chunk_scan(*operands, interpret=True)
    else:
        o, state = jax.lax.platform_dependent(*operands, tpu=deltanet_tpu.chunk_scan, default=xla)
    o = o.reshape(B, H, N * C, -1)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(dtype), state


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule token by token (decoding); arguments and results as
    `chunk_gated_delta_rule`."""
    dtype = q.dtype
    q, k, v, g, beta, region, first = _prepare(q, k, v, g, beta, segment_ids)
    state = _initial(initial_state, k, v)
    before = jnp.concatenate([first[:, None], region[:, :-1]], axis=1)
    keep = jnp.where((region == before)[:, :, None], jnp.exp(g), 0.0)  # [B, T, H]

    def step(s, xs):
        q, k, v, keep, beta = xs  # [B, H, d] and [B, H]
        s = s * keep[..., None, None]
        delta = (v - jnp.einsum("bhde,bhd->bhe", s, k)) * beta[..., None]
        s = s + k[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhde,bhd->bhe", s, q)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, keep, beta))
    state, o = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1).astype(dtype), state


# ----------------------------------------------------------------------------- causal conv1d


def causal_conv1d(
    x: jax.Array, kernel: jax.Array, segment_ids: jax.Array, conv_state: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv1d with SiLU that sees each row with its padding removed.

    x: float[B, T, C]; kernel: float[K, C] (torch's Conv1d weight [C, 1, K], transposed);
    conv_state: float[B, K-1, C], the last K-1 inputs before this call (None: zeros). A position
    reads the K-1 live inputs before it in its own segment (the first segment also reads the
    state). Returns y float[B, T, C] in x's dtype (zero at padding) and the new conv state: the
    last K-1 live inputs of the row's last segment, zeros where it has fewer.
    """
    B, T, C = x.shape
    K = kernel.shape[0]
    seg = segment_ids.astype(jnp.int32)
    live = seg != 0
    if conv_state is None:
        conv_state = jnp.zeros((B, K - 1, C), x.dtype)
    # live positions first, in order (stable): compacted row m is the row's m-th live input
    order = jnp.argsort(~live, axis=1, stable=True)
    xc = jnp.take_along_axis(x, order[:, :, None], axis=1)
    live_c = jnp.take_along_axis(live, order, axis=1)
    segc = jnp.where(live_c, jnp.take_along_axis(seg, order, axis=1), 0)
    _, first = _regions(seg)
    ext = jnp.concatenate([conv_state.astype(x.dtype), xc], axis=1)  # [B, K-1+T, C]
    ext_seg = jnp.concatenate([jnp.broadcast_to(first[:, None], (B, K - 1)), segc], axis=1)
    extf, kf = ext.astype(jnp.float32), kernel.astype(jnp.float32)
    y = sum(
        jnp.where((ext_seg[:, j : j + T] == segc)[:, :, None], extf[:, j : j + T] * kf[j], 0.0)
        for j in range(K)
    )
    y = jax.nn.silu(y).astype(x.dtype)
    count = jnp.sum(live, axis=1)
    where = jnp.clip(jnp.cumsum(live, axis=1) - 1, 0)
    y = jnp.where(live[:, :, None], jnp.take_along_axis(y, where[:, :, None], axis=1), 0)
    tail = count[:, None] + jnp.arange(K - 1)  # ext rows of the last K-1 live inputs
    new_state = jnp.take_along_axis(ext, tail[:, :, None], axis=1)
    in_last = jnp.take_along_axis(ext_seg, tail, axis=1) == jnp.max(seg, axis=1, keepdims=True)
    return y, jnp.where(in_last[:, :, None], new_state, 0)


# ----------------------------------------------------------------------------- the layer


class DeltaNetState(NamedTuple):
    """conv: float[B, K-1, conv_dim] (activation dtype), the last K-1 live inputs of the conv
    (transformers keeps [B, conv_dim, K], whose oldest column the next step never reads);
    recurrent: float32[B, H_v, d_k, d_v], the delta-rule state (as transformers)."""

    conv: jax.Array
    recurrent: jax.Array


class DepthwiseConv1d(nnx.Module):
    """The weight of a bias-free depthwise Conv1d: kernel float[K, C] (torch [C, 1, K] flattened
    and transposed, as every conv weight becomes a `kernel`)."""

    def __init__(self, channels: int, size: int, *, param_dtype: Any, rngs: nnx.Rngs | None):
        bound = 1.0 / math.sqrt(size)  # torch's default Conv1d init (fan-in = kernel size)

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

        self.kernel = param(rngs, init, (size, channels), param_dtype, (None, "heads"))


class RMSNormGated(nnx.Module):
    """`(w * (x_f32 * rsqrt(mean(x^2) + eps)).astype(x.dtype)) * silu(gate_f32)`, cast back to
    x's dtype: the weight multiplies before the gate, in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32, rngs=None):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(
            x.dtype
        )
        y = self.weight[...].astype(jnp.float32) * y.astype(jnp.float32)
        return (y * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    """Qwen3.5's linear-attention layer (transformers' Qwen3_5GatedDeltaNet, same parameter names:
    in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, conv1d, dt_bias, A_log, norm, out_proj)."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_key_heads: int,
        num_value_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_kernel_size: int = 4,
        eps: float = 1e-6,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        if num_value_heads % num_key_heads:
            raise ConfigError(
                f"linear value heads ({num_value_heads}) must be a multiple of key heads "
                f"({num_key_heads})"
            )
        self.num_key_heads, self.num_value_heads = num_key_heads, num_value_heads
        self.key_head_dim, self.value_head_dim = key_head_dim, value_head_dim
        self.conv_kernel_size = conv_kernel_size
        self.dtype = dtype
        self.key_dim = num_key_heads * key_head_dim
        self.value_dim = num_value_heads * value_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        D, Hv = hidden_size, num_value_heads
        self.in_proj_qkv = Linear(D, self.conv_dim, axes=("embed", "heads"), **kw)
        self.in_proj_z = Linear(D, self.value_dim, axes=("embed", "heads"), **kw)
        self.in_proj_b = Linear(D, Hv, axes=("embed", "heads"), **kw)
        self.in_proj_a = Linear(D, Hv, axes=("embed", "heads"), **kw)
        self.conv1d = DepthwiseConv1d(
            self.conv_dim, conv_kernel_size, param_dtype=param_dtype, rngs=rngs
        )

        def a_log_init(key, shape, dtype):  # A ~ U(0.01, 16), as the reference
            return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)

        self.dt_bias = param(rngs, ones, (Hv,), param_dtype, ("heads",))
        self.A_log = param(rngs, a_log_init, (Hv,), param_dtype, ("heads",))
        self.norm = RMSNormGated(value_head_dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.out_proj = Linear(self.value_dim, D, axes=("heads", "embed"), **kw)

    def empty_state(self, batch: int) -> DeltaNetState:
        return DeltaNetState(
            jnp.zeros((batch, self.conv_kernel_size - 1, self.conv_dim), self.dtype),
            jnp.zeros(
                (batch, self.num_value_heads, self.key_head_dim, self.value_head_dim), jnp.float32
            ),
        )

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, state: DeltaNetState | None = None
    ) -> tuple[jax.Array, DeltaNetState]:
        """x: float[B, T, D]; segment_ids: int[B, T]; state: the previous call's, or None (zeros).
        Returns float[B, T, D] (zero at padding) and the new state. T == 1 takes the recurrent
        form (decoding), longer inputs the chunked one."""
        B, T, _ = x.shape
        Hk, Hv = self.num_key_heads, self.num_value_heads
        dk, dv = self.key_head_dim, self.value_head_dim
        conv_state, recurrent = (None, None) if state is None else state
        with jax.named_scope("conv"):
            mixed, conv_state = causal_conv1d(
                self.in_proj_qkv(x), self.conv1d.kernel[...], segment_ids, conv_state
            )
        q, k, v = jnp.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = shard(q.reshape(B, T, Hk, dk), ("batch", "length", "act_kv_heads", None))
        k = shard(k.reshape(B, T, Hk, dk), ("batch", "length", "act_kv_heads", None))
        v = shard(v.reshape(B, T, Hv, dv), ("batch", "length", "act_heads", None))
        beta = jax.nn.sigmoid(self.in_proj_b(x))
        a = self.in_proj_a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        rule = recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
        with jax.named_scope("delta_rule"):
            o, recurrent = rule(q, k, v, g, beta, segment_ids, recurrent)
        o = shard(o, ("batch", "length", "act_heads", None))
        z = self.in_proj_z(x).reshape(B, T, Hv, dv)
        out = self.out_proj(self.norm(o, z).reshape(B, T, self.value_dim))
        return out, DeltaNetState(conv_state, recurrent)
