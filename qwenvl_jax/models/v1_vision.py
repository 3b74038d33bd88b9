"""The vision side of Qwen-VL v1: the OpenCLIP ViT-bigG/14 at 448 px and the 256-query
cross-attention resampler (`attn_pool`) that brings each image to 256 LLM-width embeddings.

Module names follow the original `transformer.visual` tree (conv1, positional_embedding, ln_pre,
resblocks, attn_pool, ln_post, proj), so loading/mapping_v1.py stays a table. Two details carry
the numerics of the original:
- the ViT's `in_proj` is kept in its per-head interleaved layout (columns ordered head, q|k|v,
  head_dim), which is also the layout that shards by whole heads;
- the learned 16x16 position tables are bicubically upsampled to the 32x32 patch grid exactly as
  torch's CPU `F.interpolate(mode="bicubic", align_corners=False)` computes it in float32
  (`bicubic_resize`, bit for bit).
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import V1VisionConfig
from qwenvl_jax.layers.attention import dot_product_attention
from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.mlp import MLP
from qwenvl_jax.layers.norms import LayerNorm
from qwenvl_jax.layers.remat import call_block
from qwenvl_jax.sharding import normal, param, shard

POS_TABLE = 256  # visual.py: nn.Parameter(torch.randn(256, width)), a 16x16 grid


class FrozenParam(nnx.Param):
    """A parameter that is stored and counted like any other but not trained by default:
    the forward pass stops its gradient, and optimizers should exclude it with
    `nnx.All(nnx.Param, nnx.Not(FrozenParam))`. Used for the resampler's fixed sin-cos table."""


def sincos_table(key: Any, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """Initializer of the resampler's fixed table float[g*g, D] (MAE 2-D sin-cos): for token
    row*g + col, channels [:D/2] encode col and [D/2:] row, each half [sin(p w), cos(p w)] with
    w_k = 1 / 10000^(k / (D/4)), computed in float64. Checkpoints store it; loading uses theirs."""
    del key
    n, dim = shape
    g = math.isqrt(n)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(p):
        angles = np.outer(p.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(
        np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64), indexing="ij"
    )
    table = np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)
    return jnp.asarray(table, dtype)


# ------------------------------------------------------------------------------------------
# Bicubic resize of a square position table, bit-exact with torch's float32 CPU kernel.
#
# torch computes each output as two passes of 4-tap sums (along x inside, then along y), and its
# build contracts them into fused multiply-adds: acc = fma(a0, w0, round(a1 * w1)), then
# acc = fma(a2, w2, acc), acc = fma(a3, w3, acc). The taps below reproduce those roundings with
# plain float32 additions only (so XLA's own mul+add contraction cannot change them): every
# product is made exact by splitting a into a 16-bit and an 8-bit part (the cubic weights of a 2x
# resize have at most 8 significant bits), and each fma is a correctly rounded three-term sum.


def _cubic_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the 4 clamped source indices and the 4 cubic (a = -0.75) weights,
    computed in float32 as torch does (align_corners=False)."""
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(src) / f32(dst)

    def near(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

    idx = np.zeros((dst, 4), np.int64)
    w = np.zeros((dst, 4), np.float32)
    for i in range(dst):
        real = f32(scale * (f32(i) + f32(0.5)) - f32(0.5))
        i0 = min(math.floor(real), src - 1)
        t = f32(min(max(real - f32(i0), f32(0)), f32(1)))
        w[i] = (far(t + f32(1)), near(t), near(f32(1) - t), far(f32(2) - t))
        idx[i] = [min(max(i0 - 1 + j, 0), src - 1) for j in range(4)]
    return idx, w


def _significant_bits(x: np.ndarray) -> int:
    mant = np.frexp(np.abs(x[x != 0]).astype(np.float64))[0]
    bits = 0
    while np.any(mant * 2.0**bits != np.round(mant * 2.0**bits)):
        bits += 1
    return bits


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s = fl(a + b) and the exact error e, a + b = s + e (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a = hi + lo exactly, hi with the low 8 mantissa bits cleared."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFFF00)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, a - hi


def _fma(a: jax.Array, w: jax.Array, c: jax.Array) -> jax.Array:
    """round(a * w + c) with one rounding, for w of at most 8 significant bits."""
    hi, lo = _split(a)
    s, e = _two_sum(hi * w, c)
    t, f = _two_sum(e, lo * w)
    x, y = _two_sum(s, t)
    y, z = _two_sum(y, f)
    r, d = _two_sum(x, y)
    q, g = _two_sum(r, 2 * d)
    # r is x + y rounded; when x + y is exactly halfway between r and q, the tail z decides.
    return jnp.where((d != 0) & (g == 0) & (jnp.sign(z) == jnp.sign(d)), q, r)


def _mul(a: jax.Array, w: jax.Array) -> jax.Array:
    hi, lo = _split(a)
    return hi * w + lo * w


def _taps(values: list[jax.Array], weights: list[jax.Array], exact: bool) -> jax.Array:
    if not exact:
        return (
            values[0] * weights[0]
            + values[1] * weights[1]
            + values[2] * weights[2]
            + (values[3] * weights[3])
        )
    acc = _fma(values[0], weights[0], _mul(values[1], weights[1]))
    acc = _fma(values[2], weights[2], acc)
    return _fma(values[3], weights[3], acc)


@lru_cache(maxsize=8)
def _plan(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, bool]:
    idx, w = _cubic_weights(src, dst)
    return idx, w, _significant_bits(w) <= 8


def _resize_forward(table: jax.Array, src: int, dst: int) -> jax.Array:
    idx, w, exact = _plan(src, dst)
    g = table.reshape(src, src, -1)
    inner = _taps(
        [g[:, idx[:, i]] for i in range(4)],
        [jnp.asarray(w[None, :, i, None]) for i in range(4)],
        exact,
    )  # [src, dst, C]
    out = _taps(
        [inner[idx[:, j]] for j in range(4)],
        [jnp.asarray(w[:, j, None, None]) for j in range(4)],
        exact,
    )  # [dst, dst, C]
    return out.reshape(dst * dst, -1)


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    idx, w, _ = _plan(src, dst)
    m = np.zeros((dst, src), np.float32)
    for i in range(dst):
        for j in range(4):
            m[i, idx[i, j]] += w[i, j]
    return m


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize(table: jax.Array, src: int, dst: int) -> jax.Array:
    return _resize_forward(table, src, dst)


def _resize_fwd(table, src, dst):
    return _resize_forward(table, src, dst), None


def _resize_bwd(src, dst, _, g):
    # The resize is linear: its transpose is the separable product of the 1-D weight matrices.
    m = jnp.asarray(_resize_matrix(src, dst))
    grad = jnp.einsum(
        "ay,bx,abc->yxc", m, m, g.reshape(dst, dst, -1), precision=jax.lax.Precision.HIGHEST
    )
    return (grad.reshape(src * src, -1),)


_resize.defvjp(_resize_fwd, _resize_bwd)


def bicubic_resize(table: jax.Array, num_tokens: int) -> jax.Array:
    """The original `get_abs_pos`: a square table float[S*S, C] resized bicubically to
    float32[N, C], N = num_tokens a square, computed in float32 (returned as is when S*S == N).

    For a 2x upsampling (16x16 -> 32x32 at 448 px) the result equals torch's CPU bicubic
    interpolation bit for bit; other ratios use the same taps and weights without that guarantee.
    """
    src, dst = math.isqrt(table.shape[0]), math.isqrt(num_tokens)
    table = table.astype(jnp.float32)
    if src == dst:
        return table
    return _resize(table, src, dst)


# ------------------------------------------------------------------------------------------


class VisualAttention(nnx.Module):
    """Self-attention with the per-head interleaved qkv projection of visual.py."""

    def __init__(
        self, width: int, heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None
    ):
        self.heads = heads
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # kernel float[W, 3W], columns (head, q|k|v, head_dim): rows h*3hd + [0:hd] of the torch
        # weight are head h's q, [hd:2hd] its k, [2hd:3hd] its v.
        self.in_proj = Linear(width, 3 * width, axes=("vit_embed", "vit_heads"), **kw)
        self.out_proj = Linear(width, width, axes=("vit_heads", "vit_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[n, L, W] -> float[n, L, W]."""
        n, L, W = x.shape
        qkv = self.in_proj(x).reshape(n, L, self.heads, 3, W // self.heads)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        seg = jnp.ones((n, L), jnp.int32)
        out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False)
        return self.out_proj(out.reshape(n, L, W))


class VisualAttentionBlock(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with exact GELU."""

    def __init__(self, cfg: V1VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        W = cfg.width
        nkw = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = LayerNorm(W, **nkw)
        self.attn = VisualAttention(W, cfg.heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = LayerNorm(W, **nkw)
        self.mlp = MLP(
            W,
            cfg.mlp_width,
            act="gelu",
            bias=True,
            axes=("vit_embed", "vit_mlp"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ResamplerAttention(nnx.Module):
    """nn.MultiheadAttention with its packed in_proj split into q/k/v projections (queries and
    keys/values come from different inputs)."""

    def __init__(
        self, dim: int, heads: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None
    ):
        self.heads = heads
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(dim, dim, axes=("vit_embed", "vit_heads"), **kw)
        self.k_proj = Linear(dim, dim, axes=("vit_embed", "vit_heads"), **kw)
        self.v_proj = Linear(dim, dim, axes=("vit_embed", "vit_heads"), **kw)
        self.out_proj = Linear(dim, dim, axes=("vit_heads", "vit_embed"), **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q: float[n, Q, D]; k, v: float[n, L, D] -> float[n, Q, D]."""
        n, Q, D = q.shape
        L = k.shape[1]
        hd = D // self.heads
        qh = self.q_proj(q).reshape(n, Q, self.heads, hd)
        kh = self.k_proj(k).reshape(n, L, self.heads, hd)
        vh = self.v_proj(v).reshape(n, L, self.heads, hd)
        out = dot_product_attention(
            qh,
            kh,
            vh,
            q_segment_ids=jnp.ones((n, Q), jnp.int32),
            kv_segment_ids=jnp.ones((n, L), jnp.int32),
            causal=False,
        )
        return self.out_proj(out.reshape(n, Q, D))


class Resampler(nnx.Module):
    """256 learned queries cross-attending to the ViT tokens (visual.py `Resampler`).

    q = ln_q(query) + pos_embed (16x16 sin-cos table), k = ln_kv(kv_proj(x)) + pos_embed resized
    to the patch grid, v = ln_kv(kv_proj(x)).
    """

    def __init__(self, cfg: V1VisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        D, Q = cfg.output_dim, cfg.n_queries
        self.query = param(rngs, normal(0.02), (Q, D), param_dtype, ("vit_queries", "vit_embed"))
        # The fixed 2-D sin-cos table: stored in (and loaded from) the checkpoint, never recomputed.
        table = param(None, sincos_table, (Q, D), param_dtype, ("vit_queries", "vit_embed"))
        self.pos_embed = FrozenParam(table.get_raw_value(), **table.get_metadata())
        self.kv_proj = Linear(
            cfg.width, D, axes=("vit_embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.attn = ResamplerAttention(D, D // 128, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = LayerNorm(D, **nkw)
        self.ln_kv = LayerNorm(D, **nkw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[n, L, W] ViT tokens -> float[n, Q, D]."""
        pos = jax.lax.stop_gradient(self.pos_embed[...])
        kv = self.ln_kv(self.kv_proj(x))
        pos_kv = bicubic_resize(pos, x.shape[1]).astype(kv.dtype)
        q = self.ln_q(self.query[...].astype(kv.dtype)) + pos.astype(kv.dtype)
        q = jnp.broadcast_to(q, (x.shape[0], *q.shape))
        return self.attn(q, kv + pos_kv, kv)


class VisionTransformerV1(nnx.Module):
    """`transformer.visual`: pixels float[n, 3, S, S] -> image embeddings float[n, Q, D]."""

    def __init__(
        self,
        cfg: V1VisionConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.cfg = cfg
        self.dtype = dtype
        W, P = cfg.width, cfg.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Conv2d(3, W, P, stride P, bias=False) is a Linear over the flattened (C, P, P) patch.
        self.conv1 = Linear(3 * P * P, W, axes=("vit_patch", "vit_embed"), **kw)
        # A learned 16x16 table whatever the image size, resized to the patch grid when used.
        self.positional_embedding = param(
            rngs, normal(0.02), (POS_TABLE, W), param_dtype, ("vit_pos", "vit_embed")
        )
        self.ln_pre = LayerNorm(W, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.resblocks = nnx.List([VisualAttentionBlock(cfg, **kw) for _ in range(cfg.layers)])
        self.remat = "none"  # the remat policy each block runs under (layers/remat.py)
        self.attn_pool = Resampler(cfg, **kw)
        self.ln_post = LayerNorm(
            cfg.output_dim, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.proj = param(
            rngs,
            normal(cfg.output_dim**-0.5),
            (cfg.output_dim, cfg.output_dim),
            param_dtype,
            ("vit_mlp", "embed"),
        )

    def patchify(self, pixels: jax.Array) -> jax.Array:
        """float[n, 3, S, S] -> float[n, g*g, 3*P*P], patches row-major, each laid out (C, P, P)
        like the conv weight."""
        n, C, S, _ = pixels.shape
        P = self.cfg.patch_size
        g = S // P
        x = pixels.reshape(n, C, g, P, g, P).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(n, g * g, C * P * P)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.conv1(self.patchify(jnp.asarray(pixels).astype(self.dtype)))
        x = x + bicubic_resize(self.positional_embedding[...], x.shape[1]).astype(x.dtype)
        x = shard(self.ln_pre(x), ("batch", None, "act_embed"))
        for i, block in enumerate(self.resblocks):
            with jax.named_scope(f"vit_block_{i}"):
                x = shard(call_block(block, self.remat, x), ("batch", None, "act_embed"))
        with jax.named_scope("resampler"):
            x = self.attn_pool(x)
        x = self.ln_post(x)
        return jnp.dot(x, self.proj[...].astype(x.dtype))
