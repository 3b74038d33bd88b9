"""The decoder shared by every family: Qwen-7B (Qwen-VL v1), Qwen2, Qwen3 and Qwen3-MoE.

Families differ only through TextConfig: q/k/v bias (Qwen2, v1), per-head q/k RMSNorm (Qwen3), MoE
layers (Qwen3-MoE), M-RoPE layout, and the v1 numerics (rotary in float32, dynamic NTK, logn
attention). A KV cache is passed in and returned functionally: per layer (k, v) float[B, S, K, hd],
with one int[B, S] segment-id row per batch that marks the written, non-padded slots.

The decoder layers are stored stacked: each run of consecutive layers of the same kind (dense or
MoE, see `layer_runs`) is one `DecoderLayer` whose parameters are [n, ...] arrays with the logical
axis "layers" in front (`runs.{r}.*`), and runs with `jax.lax.scan` over those arrays and the
[L, ...] KV cache in training, prefill and decoding alike, so XLA compiles one layer body per run
whatever the depth. The scan body runs under the model's remat policy (`remat`, "none" by default).
Checkpoints keep one entry per layer (`layers.{i}.*`); see `loading/stacking.py`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.layers.attention import dot_product_attention
from qwenvl_jax.layers.linear import Embed, Linear
from qwenvl_jax.layers.mlp import GatedMLP
from qwenvl_jax.layers.moe import SparseMoE
from qwenvl_jax.layers.norms import RMSNorm
from qwenvl_jax.layers.remat import checkpointed
from qwenvl_jax.layers.rope import apply_rope, inv_freq, mrope_axes, rope_angles
from qwenvl_jax.sharding import shard, stacked_params


class KVCache(NamedTuple):
    """k, v: float[L, B, S, K, hd]; segment_ids: int[B, S] (0 = empty or padding)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, length: int, dtype: Any) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), jnp.int32)
        )


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen-VL v1 dynamic NTK: 1 up to seq_length tokens, then 3, 7, 15, ..."""
    ratio = math.log(length / seq_length, 2) + 1 if length > 0 else 0
    return max(2 ** math.ceil(ratio) - 1, 1)


def layer_runs(cfg: TextConfig) -> list[tuple[int, int]]:
    """[lo, hi) of every run of consecutive decoder layers of the same kind (dense or MoE), in
    order: one stacked group of parameters and one scanned layer body each."""
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    runs, lo = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[lo]:
            runs.append((lo, i))
            lo = i
    return runs


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        self.cfg = cfg
        D, H, K, hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(D, H * hd, axes=("embed", "heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(D, K * hd, axes=("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(D, K * hd, axes=("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(H * hd, D, axes=("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, angles, segment_ids, slots, layer_cache, cache_segment_ids, cache_index):
        """slots: int[B, T] cache slots / causal positions, or None for 0..T-1 without a cache
        (the whole-sequence case the TPU attention kernel takes)."""
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, hd)
        k = self.k_proj(x).reshape(B, T, cfg.num_key_value_heads, hd)
        v = self.v_proj(x).reshape(B, T, cfg.num_key_value_heads, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        in_fp32 = not cfg.rope_in_activation_dtype
        q = apply_rope(q, angles, in_fp32=in_fp32)
        k = apply_rope(k, angles, in_fp32=in_fp32)
        if cfg.use_logn_attn:
            at = jnp.broadcast_to(jnp.arange(T), (B, T)) if slots is None else slots
            p = at.astype(jnp.float32) + 1
            scale = jnp.where(p > cfg.seq_length, jnp.log(p) / math.log(cfg.seq_length), 1.0)
            q = q * scale[:, :, None, None].astype(q.dtype)
        q = shard(q, ("batch", "length", "act_heads", None))
        if layer_cache is None:
            keys, values, kv_seg, kv_slots, new_cache = k, v, segment_ids, slots, None
        else:
            # Write this step's k/v into layer i of the cache in place (it is donated by callers
            # and carried through the scan over layers).
            k_all, v_all, i = layer_cache
            zero = jnp.zeros((), jnp.int32)
            at = (i, zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            keys = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)
            values = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)
            kv_seg = cache_segment_ids
            kv_slots = jnp.broadcast_to(jnp.arange(keys.shape[1]), kv_seg.shape)
            new_cache = (k_all, v_all)
        out = dot_product_attention(
            q,
            keys.astype(q.dtype),
            values.astype(q.dtype),
            q_segment_ids=segment_ids,
            kv_segment_ids=kv_seg,
            causal=True,
            q_positions=slots,
            kv_positions=kv_slots,
            softmax_in_fp32=cfg.softmax_in_fp32,
        )
        return self.o_proj(out.reshape(B, T, -1)), new_cache


class DecoderLayer(nnx.Module):
    """One decoder layer; built under `stacked_params(n)`, the n layers of a run (whose
    parameters are then [n, ...]: call it on one layer's slice of its state, as `TextModel`
    does)."""

    def __init__(
        self, cfg: TextConfig, index: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        if cfg.is_moe_layer(index):
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                **kw,
            )
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(
        self,
        x,
        angles,
        segment_ids,
        slots,
        layer_cache=None,
        cache_segment_ids=None,
        cache_index=None,
    ):
        with jax.named_scope("attention"):
            a, new_cache = self.self_attn(
                self.input_layernorm(x),
                angles,
                segment_ids,
                slots,
                layer_cache,
                cache_segment_ids,
                cache_index,
            )
        x = x + a
        with jax.named_scope("mlp"):
            m = self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if isinstance(m, tuple):
            m, router_logits = m
        x = shard(x + m, ("batch", "length", "act_embed"))
        return x, new_cache, router_logits


class TextModel(nnx.Module):
    """Embeddings, decoder layers and the final norm. `lm_head` lives on the top-level model."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.remat = "none"
        self.ranges = tuple(layer_runs(cfg))  # [lo, hi) of each run (see `one_run_per_layer`)
        runs = []
        for lo, hi in self.ranges:
            with stacked_params(hi - lo):
                runs.append(DecoderLayer(cfg, lo, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.runs = nnx.List(runs)
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )

    def rope(self, position_ids: jax.Array, alpha: float = 1.0) -> jax.Array:
        """position_ids: int[3, B, T] -> angles float32[B, T, head_dim/2]."""
        cfg = self.cfg
        theta = cfg.rope_theta
        if alpha != 1.0:
            theta = theta * alpha ** (cfg.head_dim / (cfg.head_dim - 2))
        freqs = inv_freq(cfg.head_dim, theta)
        return rope_angles(
            position_ids, freqs, mrope_axes(cfg.mrope_section, cfg.mrope_interleaved)
        )

    def __call__(
        self,
        embeds: jax.Array,
        position_ids: jax.Array,
        segment_ids: jax.Array,
        *,
        slots: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        deepstack: jax.Array | None = None,
        ntk_alpha: float = 1.0,
    ) -> tuple[jax.Array, KVCache | None, list[jax.Array]]:
        """embeds: float[B, T, D]; position_ids: int[3, B, T] (rotary positions);
        segment_ids: int[B, T] (0 = padding; packed samples get distinct ids);
        slots: int[B, T] the cache slot / causal index of each token (default arange + cache_index);
        deepstack: float[n, B, T, D] added after decoder layers 0..n-1 (zero at text positions).
        Returns (hidden float[B, T, D] after the final norm, the updated cache, router logits).
        """
        B, T, _ = embeds.shape
        x = shard(embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        angles = self.rope(position_ids, ntk_alpha)
        start = 0 if cache_index is None else cache_index
        if slots is None and cache is not None:
            slots = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        cache_seg = None
        if cache is not None:
            cache_seg = jax.lax.dynamic_update_slice_in_dim(
                cache.segment_ids, segment_ids.astype(jnp.int32), start, axis=1
            )
        kv = None if cache is None else (cache.k, cache.v)
        n_deep = 0 if deepstack is None else deepstack.shape[0]
        router: list[jax.Array] = []
        for (lo, hi), run in zip(self.ranges, self.runs, strict=True):
            graphdef, stacked = nnx.split(run)

            def body(carry, xs, graphdef=graphdef, deep=lo < n_deep):
                x, kv = carry
                state, i = xs
                layer_cache = None if kv is None else (*kv, i)
                layer = nnx.merge(graphdef, state)
                x, kv, rl = layer(x, angles, segment_ids, slots, layer_cache, cache_seg, start)
                if deep:  # DeepStack features enter after layers 0..n_deep-1
                    d = jax.lax.dynamic_index_in_dim(
                        deepstack, jnp.minimum(i, n_deep - 1), keepdims=False
                    )
                    x = x + jnp.where(i < n_deep, d.astype(x.dtype), jnp.zeros((), x.dtype))
                return (x, kv), rl

            body = checkpointed(body, self.remat, prevent_cse=False)
            with jax.named_scope(f"layers_{lo}_{hi}"):
                (x, kv), rls = jax.lax.scan(
                    body, (x, kv), (stacked, jnp.arange(lo, hi, dtype=jnp.int32))
                )
            if rls is not None:
                router += list(rls)
        new_cache = None if cache is None else KVCache(kv[0], kv[1], cache_seg)
        return self.norm(x), new_cache, router


def one_run_per_layer(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose decoder holds each layer as its own run of one ([1, ...]
    parameters, copied out of the stacked runs once), run by the same code.

    For decoding on the CPU: inside a loop XLA:CPU copies each layer's slice of a stacked weight
    before using it, which at batch 1 costs more than the matmuls (a 16-layer stack of 2048 x
    8192 MLPs: 551 ms a pass scanned, 142 ms as separate arrays); a loop of one trip is removed
    by the compiler, so runs of one read their own buffers. The model itself is not changed."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)  # new modules over the same arrays
    text = view.language_model
    runs = []
    for (lo, hi), run in zip(text.ranges, text.runs, strict=True):
        run_def, run_state = nnx.split(run)
        for j in range(hi - lo):
            runs.append(nnx.merge(run_def, jax.tree.map(lambda a, j=j: a[j : j + 1], run_state)))
    text.runs = nnx.List(runs)
    text.ranges = tuple((i, i + 1) for i in range(len(runs)))
    return view
