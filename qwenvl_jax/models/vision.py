"""The native-resolution vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, and their mergers.

One `VisionTower` serves the three: Qwen2-VL (LayerNorm, quick-GELU MLP), Qwen2.5-VL (RMSNorm,
SwiGLU, window attention with a few full layers), Qwen3-VL (learned position table resampled
bilinearly, tanh-GELU, DeepStack taps). Attention is block-diagonal through segment ids; the grids'
metadata comes precomputed in a `VisionBatch` (models/vision_inputs.py).

The blocks are stored stacked and grouped by their repeating pattern, as the decoder's layers are
(models/text.py): a block's kind is whether it attends over whole images or within windows, so
Qwen2.5-VL's seven window blocks and one full block are one group of period 8 repeated 4 times,
and a uniform tower one group of period 1. Groups end after each DeepStack tap, whose hidden
state is then a group's output. Each group is stored as `period` runs of [n, ...] parameters
(`runs.{r}.*`, see `block_runs`) and runs as one `jax.lax.scan` under the tower's remat policy.
Checkpoints keep one entry per block (`blocks.{i}.*`); see `loading/stacking.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import VisionConfig
from qwenvl_jax.layers.attention import dot_product_attention
from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.mlp import MLP, GatedMLP
from qwenvl_jax.layers.norms import LayerNorm, make_norm
from qwenvl_jax.layers.remat import after, checkpointed, layer_scan_unroll
from qwenvl_jax.layers.rope import apply_rope, inv_freq, rope_angles
from qwenvl_jax.models.text import LayerGroup, group_runs, tile_groups
from qwenvl_jax.models.vision_inputs import VisionBatch, is_grouped
from qwenvl_jax.sharding import normal, param, shard, stacked_params


def block_groups(cfg: VisionConfig) -> tuple[LayerGroup, ...]:
    """The ViT's block groups, in block order: blocks of one kind (full or window attention)
    share a body; a group ends after each DeepStack tap."""
    kinds = tuple(cfg.is_full(i) for i in range(cfg.depth))
    return tile_groups(kinds, tuple(i + 1 for i in cfg.deepstack_visual_indexes))


def block_runs(cfg: VisionConfig) -> list[range]:
    """The blocks of every stacked run of the tower (`VisionTower.runs`), in run order."""
    return group_runs(block_groups(cfg))


class VisionAttention(nnx.Module):
    def __init__(
        self,
        cfg: VisionConfig,
        *,
        max_segment: int | None = None,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs | None,
    ):
        D = cfg.hidden_size
        self.max_segment = max_segment  # the longest segment (a window) when known
        self.heads = cfg.num_heads
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(D, 3 * D, axes=("vit_embed", "vit_heads"), **kw)
        self.proj = Linear(D, D, axes=("vit_heads", "vit_embed"), **kw)

    def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x: float[G, N, D] (G groups of N patches, attended separately); angles:
        float32[G, N, hd/2]; segment_ids: int[G, N]."""
        G, N, D = x.shape
        qkv = self.qkv(x).reshape(G, N, 3, self.heads, D // self.heads)
        q, k, v = (qkv[:, :, i] for i in range(3))
        q = apply_rope(q, angles, in_fp32=True)
        k = apply_rope(k, angles, in_fp32=True)
        out = dot_product_attention(
            q,
            k,
            v,
            q_segment_ids=segment_ids,
            kv_segment_ids=segment_ids,
            causal=False,
            max_segment=self.max_segment,
        )
        return self.proj(out.reshape(G, N, D))


class VisionBlock(nnx.Module):
    """One ViT block, window or full attention; built under `stacked_params(n)`, the n blocks of
    a run (call it on one block's slice of its state, as `VisionTower`'s scan does)."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        windowed: bool = False,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs | None,
    ):
        D = cfg.hidden_size
        nkw = dict(eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = make_norm(cfg.norm, D, **nkw)
        self.norm2 = make_norm(cfg.norm, D, **nkw)
        self.attn = VisionAttention(
            cfg,
            max_segment=cfg.window_patches if windowed else None,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        mkw = dict(
            act=cfg.hidden_act,
            bias=True,
            axes=("vit_embed", "vit_mlp"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if cfg.gated_mlp:
            self.mlp = GatedMLP(D, cfg.intermediate_size, **mkw)
        else:
            self.mlp = MLP(D, cfg.intermediate_size, **mkw)

    def __call__(self, x, angles, segment_ids):
        x = x + self.attn(self.norm1(x), angles, segment_ids)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then every m x m patches concatenated (4D), fc1, exact GELU, fc2 to the LLM width.
    `postshuffle` (Qwen3 DeepStack) normalises after the concatenation instead of before."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        postshuffle: bool = False,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs | None,
    ):
        D = cfg.hidden_size
        self.unit = cfg.spatial_merge_size**2
        wide = D * self.unit
        self.postshuffle = postshuffle
        nkw = dict(eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        if postshuffle:
            self.norm = LayerNorm(wide, **nkw)
        else:
            self.norm = make_norm(cfg.norm, D, **nkw)
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(wide, wide, axes=("vit_merge", "vit_mlp"), **kw)
        self.fc2 = Linear(wide, cfg.out_hidden_size, axes=("vit_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[..., N, D] -> float[..., N / m^2, out]."""
        wide = (*x.shape[:-2], -1, x.shape[-1] * self.unit)
        if self.postshuffle:
            x = self.norm(x.reshape(wide))
        else:
            x = self.norm(x).reshape(wide)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(
        self,
        cfg: VisionConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Conv3d with kernel = stride = (T, P, P) is a Linear over the flattened (C, T, P, P) patch.
        self.patch_embed = Linear(
            cfg.patch_dim,
            cfg.hidden_size,
            axes=("vit_patch", "vit_embed"),
            bias=cfg.patch_bias,
            **kw,
        )
        if cfg.num_position_embeddings:
            self.pos_embed = param(
                rngs,
                normal(),
                (cfg.num_position_embeddings, cfg.hidden_size),
                param_dtype,
                ("vit_pos", "vit_embed"),
            )
        else:
            self.pos_embed = None
        self.groups = block_groups(cfg)
        runs = []
        for blocks in group_runs(self.groups):
            with stacked_params(len(blocks)):
                runs.append(VisionBlock(cfg, windowed=not cfg.is_full(blocks[0]), **kw))
        self.runs = nnx.List(runs)
        self.remat = "none"  # the remat policy the scan bodies run under (layers/remat.py)
        self.merger = PatchMerger(cfg, **kw)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, **kw) for _ in cfg.deepstack_visual_indexes]
        )

    def __call__(self, batch: VisionBatch) -> tuple[jax.Array, jax.Array | None]:
        """Returns (merged tokens float[N/m^2, out] in raster order, DeepStack features
        float[n_deepstack, N/m^2, out] or None); a grouped batch (a leading group axis G on
        every field) gives float[G, N/m^2, out] and float[n_deepstack, G, N/m^2, out]."""
        grouped = is_grouped(batch)
        if not grouped:
            batch = VisionBatch(*(jnp.asarray(v)[None] for v in batch))
        cfg = self.cfg
        x = self.patch_embed(jnp.asarray(batch.pixels))
        if self.pos_embed is not None:
            table = jnp.take(self.pos_embed[...].astype(jnp.float32), batch.interp_idx, axis=0)
            x = x + jnp.sum(table * batch.interp_w[..., None], axis=-2).astype(x.dtype)
        x = jnp.take_along_axis(x, batch.perm[..., None], axis=1)
        # groups are split over the data axes; a lone list of patches shards its patches
        axes = ("vit_groups", None, None) if grouped else (None, "vit_tokens", None)
        x = shard(x, axes)
        hd = cfg.head_dim
        freqs = np.tile(inv_freq(hd // 2, cfg.rope_theta), 2)  # (h then w) x hd/4 frequencies
        pos = jnp.moveaxis(batch.pos_hw, 1, 0)  # [2, G, N]
        angles = rope_angles(pos, freqs, np.repeat(np.arange(2), hd // 4))
        unperm = batch.unperm[..., None]
        x, taps = self.run_blocks(x, angles, batch.segment_ids, batch.window_segment_ids)
        deepstack = [
            jnp.take_along_axis(self.deepstack_merger_list[j](h), unperm, axis=1) for j, h in taps
        ]
        merged = jnp.take_along_axis(self.merger(x), unperm, axis=1)
        deep = jnp.stack(deepstack) if deepstack else None
        if not grouped:
            merged = merged[0]
            deep = None if deep is None else deep[:, 0]
        return merged, deep

    def run_blocks(
        self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array, window_segment_ids: jax.Array
    ) -> tuple[jax.Array, list[tuple[int, jax.Array]]]:
        """The blocks over x float[G, N, D], one scan per group. Returns (x after the last block,
        [(j, hidden state after block deepstack_visual_indexes[j])] in block order)."""
        cfg = self.cfg
        taps = []
        r = 0
        for group in self.groups:
            lo, p, n = group
            graphdefs, stacked = zip(*(nnx.split(run) for run in self.runs[r : r + p]))
            r += p
            full = tuple(cfg.is_full(lo + k) for k in range(p))

            # a loop of one trip keeps remat's CSE barrier (see TextModel)
            remat = functools.partial(checkpointed, policy=self.remat, prevent_cse=n == 1)

            def apply(state, x, seg, graphdef):
                return nnx.merge(graphdef, state)(x, angles, seg)

            def body(x, states, graphdefs=graphdefs, full=full, p=p, remat=remat):
                for k, (graphdef, state, f) in enumerate(zip(graphdefs, states, full, strict=True)):
                    if k:
                        state, x = after(state, x)
                    seg = segment_ids if f else window_segment_ids
                    # a pattern of several blocks rematerialises each on its own: the backward
                    # pass holds one block's activations at a time, not the pattern's
                    run = functools.partial(apply, graphdef=graphdef)
                    x = (remat(run, in_order=True) if p > 1 else run)(state, x, seg)
                return x, None

            if p == 1:
                body = remat(body)
            with jax.named_scope(f"vit_blocks_{lo}_{group.hi}"):
                x, _ = jax.lax.scan(body, x, stacked, unroll=layer_scan_unroll())
            if group.hi - 1 in cfg.deepstack_visual_indexes:
                taps.append((cfg.deepstack_visual_indexes.index(group.hi - 1), x))
        return x, taps
