"""The decoder shared by every family: Qwen-7B (Qwen-VL v1), Qwen2, Qwen3, Qwen3-MoE and the hybrid
Qwen3.5 / Qwen3.5-MoE.

Families differ only through TextConfig: q/k/v bias (Qwen2, v1), per-head q/k RMSNorm (Qwen3), MoE
layers (Qwen3-MoE; with a gated shared expert, Qwen3.5-MoE), M-RoPE layout, the v1 numerics
(rotary in float32, dynamic NTK, logn attention), and Qwen3.5's hybrid layers: `layer_types` mixes
Gated DeltaNet layers (`layers/deltanet.py`) with gated full attention (q_proj giving a query and
an output gate per head, partial rotary), every RMSNorm zero-centred. A cache is passed in and
returned functionally: per full-attention layer (k, v) float[B, S, K, hd], with one int[B, S]
segment-id row per batch that marks the written, non-padded slots, and per linear-attention layer
its `DeltaNetState` (conv inputs and the float32 delta-rule state).

The decoder layers are stored stacked and grouped by their repeating pattern (`layer_groups`): a
group is a pattern of p layer kinds (layer type, dense or MoE) repeated n times, stored as p
`DecoderLayer`s whose parameters are [n, ...] arrays with the logical axis "layers" in front
(`runs.{r}.*`, see `layer_runs`), and runs as one `jax.lax.scan` over the n repeats whose body
applies the p layers in order, carrying the cache, in training, prefill and decoding alike. A
uniform decoder is one group of one layer kind; Qwen3.5's hybrid pattern (three Gated DeltaNet
layers, one full attention) one group of four, so XLA compiles the same program whatever the
depth. The scan body runs under the model's remat policy (`remat`, "none" by default).
Checkpoints keep one entry per layer (`layers.{i}.*`); see `loading/stacking.py`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.layers.attention import dot_product_attention
from qwenvl_jax.layers.deltanet import DeltaNetState, GatedDeltaNet
from qwenvl_jax.layers.linear import Embed, Linear
from qwenvl_jax.layers.mlp import GatedMLP
from qwenvl_jax.layers.moe import SparseMoE
from qwenvl_jax.layers.norms import RMSNorm
from qwenvl_jax.layers.remat import after, checkpointed, layer_scan_unroll
from qwenvl_jax.layers.rope import apply_rope, inv_freq, mrope_axes, rope_angles
from qwenvl_jax.sharding import shard, stacked_params


class KVCache(NamedTuple):
    """The decoding cache. k, v: float[La, B, S, K, hd] for the La full-attention layers, in layer
    order; segment_ids: int[B, S] (0 = empty or padding); for the Ll linear-attention layers
    (Qwen3.5), conv: float[Ll, B, kernel-1, conv_dim] (activation dtype) and recurrent:
    float32[Ll, B, H_v, d_k, d_v] (see `DeltaNetState`), None without such layers."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    conv: jax.Array | None = None
    recurrent: jax.Array | None = None

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, length: int, dtype: Any) -> KVCache:
        n_attn, n_linear = cache_counts(cfg)
        shape = (n_attn, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        conv = recurrent = None
        if n_linear:
            conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
            conv_dim += cfg.linear_num_value_heads * cfg.linear_value_head_dim
            conv = jnp.zeros((n_linear, batch, cfg.linear_conv_kernel_dim - 1, conv_dim), dtype)
            recurrent = jnp.zeros(
                (
                    n_linear,
                    batch,
                    cfg.linear_num_value_heads,
                    cfg.linear_key_head_dim,
                    cfg.linear_value_head_dim,
                ),
                jnp.float32,
            )
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, length), jnp.int32),
            conv,
            recurrent,
        )


def cache_slots(cfg: TextConfig) -> list[int]:
    """Each decoder layer's index among the layers of its type: its place in the cache's k/v
    (full attention) or conv/recurrent (linear attention) arrays."""
    seen = {"full_attention": 0, "linear_attention": 0}
    out = []
    for i in range(cfg.num_hidden_layers):
        t = cfg.layer_type(i)
        out.append(seen[t])
        seen[t] += 1
    return out


def cache_counts(cfg: TextConfig) -> tuple[int, int]:
    """(full-attention layers, linear-attention layers)."""
    n_linear = sum(cfg.layer_type(i) == "linear_attention" for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers - n_linear, n_linear


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen-VL v1 dynamic NTK: 1 up to seq_length tokens, then 3, 7, 15, ..."""
    ratio = math.log(length / seq_length, 2) + 1 if length > 0 else 0
    return max(2 ** math.ceil(ratio) - 1, 1)


def layer_kind(cfg: TextConfig, i: int) -> tuple[str, bool]:
    """(layer type, MoE or not) of decoder layer i: layers of one kind share one layer body."""
    return cfg.layer_type(i), cfg.is_moe_layer(i)


class LayerGroup(NamedTuple):
    """Layers [lo, lo + period * repeats) (decoder layers or ViT blocks): a pattern of `period`
    layer kinds repeated `repeats` times. It is stored as `period` stacked runs (run k holds
    layers lo + k, lo + k + period, ...) and runs as one scan over the repeats whose body applies
    the pattern in order."""

    lo: int
    period: int
    repeats: int

    @property
    def hi(self) -> int:
        return self.lo + self.period * self.repeats

    def run(self, k: int) -> range:
        """The layers of the group's k-th run (pattern position k), in order."""
        return range(self.lo + k, self.hi, self.period)


@functools.cache
def _tiling(kinds: tuple) -> tuple[LayerGroup, ...]:
    """The groups that tile `kinds` with the fewest layer bodies (the sum of the periods: what
    the compiler compiles), and of those the fewest groups (scans)."""
    L = len(kinds)
    best: list[tuple[int, int, tuple[LayerGroup, ...]]] = [(0, 0, ())] * (L + 1)
    for s in range(L - 1, -1, -1):
        options = []
        for p in range(1, L - s + 1):
            n = 1
            while s + p * (n + 1) <= L and kinds[s + p * n : s + p * (n + 1)] == kinds[s : s + p]:
                n += 1
            for m in range(1, n + 1):  # a shorter tiling may leave a better rest
                bodies, groups, rest = best[s + p * m]
                options.append((bodies + p, groups + 1, (LayerGroup(s, p, m), *rest)))
        best[s] = min(options, key=lambda o: o[:2])
    return best[0][2]


def tile_groups(kinds: tuple, cuts: tuple[int, ...] = ()) -> tuple[LayerGroup, ...]:
    """The groups of a stack of layers of these kinds (any hashable, equal for layers that share
    a layer body): the fewest layer bodies, then the fewest scans. Every index in `cuts` starts
    a group, so the hidden state there is a group's output (the ViT's DeepStack taps)."""
    bounds = sorted({0, len(kinds), *(c for c in cuts if 0 < c < len(kinds))})
    return tuple(
        LayerGroup(lo + g.lo, g.period, g.repeats)
        for lo, hi in zip(bounds, bounds[1:])
        for g in _tiling(tuple(kinds[lo:hi]))
    )


def layer_groups(cfg: TextConfig) -> tuple[LayerGroup, ...]:
    """The decoder's layer groups, in layer order. A uniform decoder is one group of period 1;
    Qwen3.5's hybrid pattern (three linear-attention layers, one full) is one group of period 4
    whatever the depth; layers outside the pattern (dense before MoE layers, a partial pattern at
    the end) are groups of their own."""
    return tile_groups(tuple(layer_kind(cfg, i) for i in range(cfg.num_hidden_layers)))


def group_runs(groups: tuple[LayerGroup, ...]) -> list[range]:
    """The layers of every stacked run (`TextModel.runs`, `VisionTower.runs`) of these groups,
    in run order."""
    return [g.run(k) for g in groups for k in range(g.period)]


def layer_runs(cfg: TextConfig) -> list[range]:
    """The layers of every stacked run of the decoder (`TextModel.runs`), in run order: one group
    of [n, ...] parameters each."""
    return group_runs(layer_groups(cfg))


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
        q_width = 2 * H * hd if cfg.attn_output_gate else H * hd  # [query | gate] per head
        self.q_proj = Linear(D, q_width, axes=("embed", "heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(D, K * hd, axes=("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(D, K * hd, axes=("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(H * hd, D, axes=("heads", "embed"), **kw)
        if cfg.qk_norm:
            nkw = dict(
                eps=cfg.rms_norm_eps,
                param_dtype=param_dtype,
                zero_centered=cfg.norm_zero_centered,
                rngs=rngs,
            )
            self.q_norm = RMSNorm(hd, **nkw)
            self.k_norm = RMSNorm(hd, **nkw)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, angles, segment_ids, slots, layer_cache, cache_segment_ids, cache_index):
        """slots: int[B, T] cache slots / causal positions, or None for 0..T-1 without a cache
        (the whole-sequence case the TPU attention kernel takes)."""
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        q = self.q_proj(x)
        gate = None
        if cfg.attn_output_gate:
            q, gate = jnp.split(q.reshape(B, T, cfg.num_attention_heads, 2 * hd), 2, axis=-1)
            gate = gate.reshape(B, T, -1)
        q = q.reshape(B, T, cfg.num_attention_heads, hd)
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
        out = out.reshape(B, T, -1)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        return self.o_proj(out), new_cache


class DecoderLayer(nnx.Module):
    """One decoder layer of a kind (`layer_kind`): full attention or Gated DeltaNet, then a dense
    or sparse MLP; built under `stacked_params(n)`, the n layers of a run (whose parameters are
    then [n, ...]: call it on one layer's slice of its state, as `TextModel`'s scan does)."""

    def __init__(
        self,
        cfg: TextConfig,
        kind: tuple[str, bool],
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs | None,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type, moe = kind
        nkw = dict(
            eps=cfg.rms_norm_eps,
            param_dtype=param_dtype,
            zero_centered=cfg.norm_zero_centered,
            rngs=rngs,
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                cfg.hidden_size,
                num_key_heads=cfg.linear_num_key_heads,
                num_value_heads=cfg.linear_num_value_heads,
                key_head_dim=cfg.linear_key_head_dim,
                value_head_dim=cfg.linear_value_head_dim,
                conv_kernel_size=cfg.linear_conv_kernel_dim,
                eps=cfg.rms_norm_eps,
                **kw,
            )
        else:
            self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        if moe:
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                shared_hidden=cfg.shared_expert_intermediate_size,
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
        cache=None,
        slot=None,
        cache_segment_ids=None,
        cache_index=None,
    ):
        """cache: the whole cache's arrays (k, v, conv, recurrent) or None; slot: this layer's
        index among the cache's layers of its type. Returns (x, the cache's arrays, router
        logits or None)."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            with jax.named_scope("linear_attention"):
                state = None
                if cache is not None:
                    k_all, v_all, conv, rec = cache
                    state = DeltaNetState(
                        jax.lax.dynamic_index_in_dim(conv, slot, keepdims=False),
                        jax.lax.dynamic_index_in_dim(rec, slot, keepdims=False),
                    )
                a, state = self.linear_attn(h, segment_ids, state)
                if cache is not None:
                    conv = jax.lax.dynamic_update_index_in_dim(
                        conv, state.conv.astype(conv.dtype), slot, 0
                    )
                    rec = jax.lax.dynamic_update_index_in_dim(
                        rec, state.recurrent.astype(rec.dtype), slot, 0
                    )
                    cache = (k_all, v_all, conv, rec)
        else:
            with jax.named_scope("attention"):
                layer_cache = None if cache is None else (cache[0], cache[1], slot)
                a, kv = self.self_attn(
                    h, angles, segment_ids, slots, layer_cache, cache_segment_ids, cache_index
                )
                if cache is not None:
                    cache = (*kv, *cache[2:])
        x = x + a
        with jax.named_scope("mlp"):
            m = self.mlp(self.post_attention_layernorm(x))
        router_logits = None
        if isinstance(m, tuple):
            m, router_logits = m
        x = shard(x + m, ("batch", "length", "act_embed"))
        return x, cache, router_logits


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
        self.groups = layer_groups(cfg)  # see `one_run_per_layer`
        runs = []
        for layers in group_runs(self.groups):
            with stacked_params(len(layers)):
                kind = layer_kind(cfg, layers[0])
                runs.append(
                    DecoderLayer(cfg, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                )
        self.runs = nnx.List(runs)
        self.norm = RMSNorm(
            cfg.hidden_size,
            eps=cfg.rms_norm_eps,
            param_dtype=param_dtype,
            zero_centered=cfg.norm_zero_centered,
            rngs=rngs,
        )

    def rope(self, position_ids: jax.Array, alpha: float = 1.0) -> jax.Array:
        """position_ids: int[3, B, T] -> angles float32[B, T, rotary_dim/2]."""
        cfg = self.cfg
        theta = cfg.rope_theta
        if alpha != 1.0:
            theta = theta * alpha ** (cfg.head_dim / (cfg.head_dim - 2))
        freqs = inv_freq(cfg.rotary_dim, theta)
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
        arrays = None if cache is None else (cache.k, cache.v, cache.conv, cache.recurrent)
        n_deep = 0 if deepstack is None else deepstack.shape[0]
        slot_of = cache_slots(self.cfg)
        router: list[jax.Array] = []
        r = 0
        for group in self.groups:
            lo, p, n = group
            graphdefs, stacked = zip(*(nnx.split(run) for run in self.runs[r : r + p]))
            r += p

            # A loop of one trip is removed by the compiler, and CSE would then merge the
            # rematerialised forward with the original one and keep the whole layer's activations
            # (a hybrid decoder's full-attention layers): one trip keeps remat's CSE barrier.
            remat = functools.partial(checkpointed, policy=self.remat, prevent_cse=n == 1)

            def apply(state, x, arrays, slot, graphdef):
                layer = nnx.merge(graphdef, state)
                return layer(x, angles, segment_ids, slots, arrays, slot, cache_seg, start)

            def body(carry, xs, graphdefs=graphdefs, lo=lo, p=p, remat=remat):
                x, arrays = carry
                states, index, slot = xs
                rls = []
                for k, (graphdef, state) in enumerate(zip(graphdefs, states)):
                    if k:
                        state, x = after(state, x)
                    # a pattern of several layers rematerialises each on its own, so that the
                    # backward pass holds one layer's activations at a time, not the pattern's
                    run = functools.partial(apply, graphdef=graphdef)
                    x, arrays, rl = (remat(run, in_order=True) if p > 1 else run)(
                        state, x, arrays, slot[k]
                    )
                    if lo + k < n_deep:  # DeepStack features enter after layers 0..n_deep-1
                        i = index[k]
                        d = jax.lax.dynamic_index_in_dim(
                            deepstack, jnp.minimum(i, n_deep - 1), keepdims=False
                        )
                        x = x + jnp.where(i < n_deep, d.astype(x.dtype), jnp.zeros((), x.dtype))
                    rls.append(rl)
                return (x, arrays), tuple(rls)

            if p == 1:
                body = remat(body)
            index = jnp.arange(lo, group.hi, dtype=jnp.int32).reshape(n, p)
            slot = jnp.asarray(slot_of[lo : group.hi], jnp.int32).reshape(n, p)
            with jax.named_scope(f"layers_{lo}_{group.hi}"):
                (x, arrays), rls = jax.lax.scan(
                    body, (x, arrays), (stacked, index, slot), unroll=layer_scan_unroll()
                )
            # router logits [n, ...] per pattern position, back in layer order
            router += [rl[j] for j in range(n) for rl in rls if rl is not None]
        new_cache = None if cache is None else KVCache(*arrays[:2], cache_seg, *arrays[2:])
        return self.norm(x), new_cache, router


def one_run_per_layer(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose decoder, and vision tower when it has stacked runs, hold each layer
    (block) as its own group of one ([1, ...] parameters, copied out of the stacked runs once),
    run by the same code.

    For inference on the CPU: inside a loop XLA:CPU copies each layer's slice of a stacked weight
    before using it, which at batch 1 costs more than the matmuls (a 16-layer stack of 2048 x
    8192 MLPs: 551 ms a pass scanned, 142 ms as separate arrays; a 4-block ViT of width 1280 spent
    83 ms of its prefill's 2.4 s of thread time in such copies); a loop of one trip is removed by
    the compiler, so runs of one read their own buffers. The model itself is not changed."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)  # new modules over the same arrays
    _one_group_per_layer(view.language_model)
    visual = getattr(view, "visual", None)
    if visual is not None and hasattr(visual, "runs") and hasattr(visual, "groups"):
        _one_group_per_layer(visual)
    return view


def _one_group_per_layer(module: nnx.Module) -> None:
    """Replace `module.runs` / `module.groups` (stacked runs of layers) by one run per layer."""
    stacked = [nnx.split(run) for run in module.runs]
    where = {
        i: (r, j)
        for r, layers in enumerate(group_runs(module.groups))
        for j, i in enumerate(layers)
    }
    runs = []
    for i in range(module.groups[-1].hi):
        r, j = where[i]
        run_def, run_state = stacked[r]
        runs.append(nnx.merge(run_def, jax.tree.map(lambda a, j=j: a[j : j + 1], run_state)))
    module.runs = nnx.List(runs)
    module.groups = tuple(LayerGroup(i, 1, 1) for i in range(len(runs)))
