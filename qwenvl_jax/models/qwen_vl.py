"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: vision tower + decoder + lm_head.

`__call__` takes the arrays a Hugging Face processor returns and gives logits; it computes the
host-side metadata (M-RoPE positions, the vision batch) and runs `forward`, the pure-array function
that jitted prefill, decoding and training call directly.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.models.base import VisionLanguageModel, jitted_logits
from qwenvl_jax.models.mrope import get_rope_index
from qwenvl_jax.models.vision import VisionTower
from qwenvl_jax.models.vision_inputs import VisionBatch, is_grouped, make_vision_batch


class ModelInputs(NamedTuple):
    """What `forward` takes, prepared on the host from processor outputs (see `prepare`).

    input_ids int[B, T]; segment_ids int[B, T] (0 = padding); position_ids int[3, B, T];
    vision: the family's vision input (VisionBatch, or pixel values for Qwen-VL v1) or None;
    next_position int[B]: the rotary position of the first generated token (decode step s uses
    next_position + s on every axis); ntk_alpha: Qwen-VL v1's dynamic NTK factor (1.0 otherwise).
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    vision: Any
    next_position: np.ndarray
    ntk_alpha: float = 1.0


def scatter_vision(
    embeds: jax.Array, ids: jax.Array, token_id: int, features: jax.Array, offset: jax.Array | int
) -> jax.Array:
    """Write features[offset + k] at the k-th position (row-major over the batch) where ids ==
    token_id. embeds: float[B, T, D] (or [n, B, T, D] with features [n, N, D])."""
    hit = ids == token_id
    k = jnp.cumsum(hit.reshape(-1)).reshape(hit.shape) - 1 + offset
    k = jnp.clip(k, 0, features.shape[-2] - 1)
    gathered = jnp.take(features, k, axis=-2).astype(embeds.dtype)
    return jnp.where(hit[..., None], gathered, embeds)


class QwenVLForConditionalGeneration(VisionLanguageModel):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(config, visual, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # ----------------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
    ) -> jax.Array:
        """Logits float[B, T, vocab] for the inputs a Hugging Face processor returns."""
        x = self.prepare(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            mm_token_type_ids,
        )
        return jitted_logits(self, x.input_ids, x.segment_ids, x.position_ids, x.vision)

    def prepare(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        mm_token_type_ids=None,
        *,
        patch_bucket: int | None = None,
    ) -> ModelInputs:
        """Host-side preparation: M-RoPE positions and the padded vision batch (to
        `patch_bucket` patches, default `vision_inputs.bucket`)."""
        del mm_token_type_ids  # the token ids say the same
        ids = np.asarray(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        positions, deltas = get_rope_index(
            self.config, ids, mask, image_grid_thw, video_grid_thw, second_per_grid_ts
        )
        vision = make_vision_batch(
            self.config.vision,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            pad_to=patch_bucket,
        )
        return ModelInputs(
            ids.astype(np.int32),
            mask.astype(np.int32),
            positions,
            vision,
            (deltas + ids.shape[1]).astype(np.int32),
        )

    def embed(
        self, input_ids: jax.Array, vision: VisionBatch | None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Text embeddings with the vision features written in; DeepStack features scattered to
        float[n, B, T, D] (None without DeepStack or vision)."""
        cfg = self.config
        x = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return x, None
        feats, deep = self.visual(vision)
        off = jnp.asarray(vision.video_offset)
        if is_grouped(vision):  # group g holds the media of rows [g * B / G, (g + 1) * B / G)
            G = feats.shape[0]
            split = lambda a: a.reshape(G, a.shape[0] // G, *a.shape[1:])
            x = jax.vmap(partial(_scatter_media, cfg))(split(x), split(input_ids), feats, off)
            x = x.reshape(-1, *x.shape[2:])
            if deep is None:
                return x, None
            zeros = jnp.zeros((G, deep.shape[0], x.shape[0] // G, *x.shape[1:]), x.dtype)
            ds = jax.vmap(partial(_scatter_media, cfg), in_axes=(0, 0, 1, 0))(
                zeros, split(input_ids), deep, off
            )  # [G, n, B / G, T, D]
            ds = jnp.moveaxis(ds, 0, 1)
            return x, ds.reshape(ds.shape[0], -1, *ds.shape[3:])
        x = _scatter_media(cfg, x, input_ids, feats, off)
        ds = None
        if deep is not None:
            zeros = jnp.zeros((deep.shape[0], *x.shape), x.dtype)
            ds = _scatter_media(cfg, zeros, input_ids, deep, off)
        return x, ds


def _scatter_media(cfg: ModelConfig, embeds, ids, features, video_offset):
    """The images' features (from 0) and the videos' (from video_offset) written in."""
    x = scatter_vision(embeds, ids, cfg.image_token_id, features, 0)
    return scatter_vision(x, ids, cfg.video_token_id, features, video_offset)
