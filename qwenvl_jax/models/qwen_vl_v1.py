"""Qwen-VL and Qwen-VL-Chat (v1, arXiv 2308.12966): ViT-bigG + resampler + the Qwen-7B decoder.

The decoder is the shared `TextModel` with the v1 flags of TextConfig (fused c_attn split into
biased q/k/v, w2 as the SwiGLU gate, rotate-half RoPE in float32, dynamic NTK, logn attention).
Positions go by slot, as in the original code: the rotary position of a token is its index in
the (padded) sequence, so `position_ids` is `arange(T)` on all three M-RoPE rows, and with
`mrope_section = (head_dim / 2, 0, 0)` the shared rotary is plain 1-D RoPE.

Images enter as `pixel_values float[n, 3, 448, 448]` in prompt order: the 256 positions after
each `<img>` token (151857) are overwritten with that image's resampler output, whatever ids
(path bytes, `<imgpad>`) they hold. The interface (`__call__`, `prepare`, `forward`) is the one
of the modern families, so generation and training code drive both alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.errors import InputError
from qwenvl_jax.models.base import VisionLanguageModel, jitted_logits
from qwenvl_jax.models.qwen_vl import ModelInputs
from qwenvl_jax.models.text import ntk_alpha
from qwenvl_jax.models.v1_vision import VisionTransformerV1


def image_spans(input_ids: np.ndarray, start_id: int, queries: int) -> list[tuple[int, int]]:
    """(row, position of `<img>`) of every image in row-major order; each `<img>` must be
    followed by `queries` positions and `</img>` (start_id + 1). input_ids: int[B, T]."""
    ids = np.asarray(input_ids)
    end_id = start_id + 1
    spans = []
    for b, t in zip(*np.nonzero(ids == start_id)):
        close = t + queries + 1
        if close >= ids.shape[1] or ids[b, close] != end_id:
            raise InputError(
                f"<img> at position {t} of row {b} is not followed by {queries} "
                "image positions and </img> (a truncated or malformed prompt?)"
            )
        spans.append((int(b), int(t)))
    n_end = int(np.sum(ids == end_id))
    if n_end != len(spans):
        raise InputError(f"the prompt has {len(spans)} <img> but {n_end} </img> tokens")
    return spans


def splice_images(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, start_id: int
) -> jax.Array:
    """Write image k's features at the `Q` positions after the k-th `<img>` (row-major over the
    batch). embeds float[B, T, D]; input_ids int[B, T]; features float[n, Q, D] (extra padding
    images are never read)."""
    B, T, _ = embeds.shape
    n, Q, D = features.shape
    hit = input_ids == start_id
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    last = jax.lax.cummax(jnp.where(hit, pos, -1), axis=1)  # latest <img> at or before t
    offset = pos - last - 1
    inside = (last >= 0) & (offset >= 0) & (offset < Q)
    image = jnp.cumsum(hit.reshape(-1)).reshape(B, T) - 1  # index of that <img>, row-major
    flat = jnp.clip(image * Q + offset, 0, n * Q - 1)
    gathered = jnp.take(features.reshape(n * Q, D), flat, axis=0).astype(embeds.dtype)
    return jnp.where(inside[..., None], gathered, embeds)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class QwenVLV1ForCausalLM(VisionLanguageModel):
    """`QWenLMHeadModel` of the original remote code, on the shared decoder."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        visual = VisionTransformerV1(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(config, visual, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, input_ids, attention_mask=None, pixel_values=None, **ignored: Any
    ) -> jax.Array:
        """Logits float[B, T, vocab] for input_ids int[B, T], attention_mask int[B, T] (1 = token,
        0 = padding) and pixel_values float[n_images, 3, 448, 448]: `prepare` on the host, then
        `forward`, compiled once per input shape. Other processor outputs are ignored."""
        x = self.prepare(input_ids, attention_mask, pixel_values)
        return jitted_logits(
            self, x.input_ids, x.segment_ids, x.position_ids, x.vision, x.ntk_alpha
        )

    def prepare(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        *,
        image_bucket: int | None = None,
        **ignored: Any,
    ) -> ModelInputs:
        """Host-side preparation: checks the image spans, pads pixel_values with all-zero images
        to `image_bucket` images (default: the next power of two) so that jitted callers compile
        once per bucket, and computes the slot positions (arange(T) on the 3 rows, less the
        columns that are padding in every row) and the prefill NTK factor of that length."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be int[B, T], got shape {ids.shape}")
        B, T = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        vcfg = self.config.vision
        n = len(image_spans(ids, vcfg.image_start_id, vcfg.n_queries))
        vision = None
        if n:
            if pixel_values is None:
                raise InputError(f"the prompt has {n} image(s) but no pixel_values were given")
            pixels = np.asarray(pixel_values, dtype=np.float32)
            expected = (3, vcfg.image_size, vcfg.image_size)
            if pixels.ndim != 4 or pixels.shape[1:] != expected:
                raise InputError(
                    f"pixel_values must be float[n, {', '.join(map(str, expected))}]"
                    f", got shape {pixels.shape}"
                )
            if pixels.shape[0] != n:
                raise InputError(
                    f"the prompt has {n} image(s) but pixel_values holds {pixels.shape[0]}"
                )
            size = max(image_bucket or _bucket(n), n)
            vision = np.concatenate([pixels, np.zeros((size - n, *expected), np.float32)])
        # Positions by slot, counted from the first column that holds a token in some row: the
        # layout the original sees for a batch padded to its longest prompt, so extra padding
        # added for bucketing changes nothing.
        shift = int(np.argmax(mask.any(axis=0))) if mask.any() else 0
        slots = np.maximum(np.arange(T, dtype=np.int32) - shift, 0)
        positions = np.broadcast_to(slots, (3, B, T)).copy()
        t = self.config.text
        alpha = float(ntk_alpha(T - shift, t.seq_length)) if t.use_dynamic_ntk else 1.0
        return ModelInputs(
            ids.astype(np.int32),
            mask.astype(np.int32),
            positions,
            vision,
            np.full((B,), T - shift, np.int32),
            alpha,
        )

    def embed(self, input_ids: jax.Array, vision: jax.Array | None) -> tuple[jax.Array, None]:
        """Token embeddings float[B, T, D] with the image features spliced in (no DeepStack)."""
        x = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return x, None
        features = self.visual(vision)
        return splice_images(x, input_ids, features, self.config.vision.image_start_id), None
