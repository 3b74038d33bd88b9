"""What every family's top-level model shares: the layout (`visual`, `language_model`,
`lm_head`), the output projection, and `forward`, the pure-array function that jitted prefill,
decoding and training call. A family adds its vision tower, `embed` (how the vision features enter
the token embeddings) and `prepare` (host-side inputs from processor outputs).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.models.mtp import MultiTokenPredictor
from qwenvl_jax.models.text import KVCache, TextModel
from qwenvl_jax.sharding import shard


class VisionLanguageModel(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        visual: nnx.Module,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs | None,
    ):
        self.config = config
        self.family = config.family
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual = visual
        self.language_model = TextModel(config.text, **kw)
        t = config.text
        self.lm_head = (
            None
            if t.tie_word_embeddings
            else Linear(t.hidden_size, t.vocab_size, axes=("embed", "vocab"), **kw)
        )
        # Qwen3.5's multi-token-prediction weights: stored and converted, not run (models/mtp.py)
        self.mtp = MultiTokenPredictor(t, **kw) if t.mtp_num_hidden_layers else None

    def embed(self, input_ids: jax.Array, vision: Any) -> tuple[jax.Array, jax.Array | None]:
        """(token embeddings float[B, T, D] with the vision features written in, DeepStack
        features float[n, B, T, D] or None)."""
        raise NotImplementedError

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            out = self.language_model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return shard(out, ("batch", "length", "act_vocab"))

    def forward(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array,
        position_ids: jax.Array,
        vision: Any = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        slots: jax.Array | None = None,
        ntk_alpha: float = 1.0,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None, list[jax.Array]]:
        """input_ids int[B, T]; segment_ids int[B, T] (0 = padding); position_ids int[3, B, T];
        vision: the family's vision input or None (decode steps); ntk_alpha: Qwen-VL v1's static
        prefill factor (1.0 elsewhere), kept for decoding.
        Returns (logits float[B, T, vocab], the updated cache, router logits per MoE layer); with
        logits_to_keep = n > 0, the logits of the last n positions only; with return_hidden,
        the final hidden states float[B, T, D] instead of logits (`logits` maps them: the
        training loss does, a chunk of the sequence at a time)."""
        x, deepstack = self.embed(input_ids, vision)
        hidden, cache, router = self.language_model(
            x,
            position_ids,
            segment_ids,
            slots=slots,
            cache=cache,
            cache_index=cache_index,
            deepstack=deepstack,
            ntk_alpha=ntk_alpha,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if return_hidden:
            return hidden, cache, router
        return self.logits(hidden), cache, router


@functools.partial(nnx.jit, static_argnums=5)
def jitted_logits(model, input_ids, segment_ids, position_ids, vision, ntk_alpha=1.0):
    """`model.forward(...)[0]` compiled once per input shape: what `model(...)` runs."""
    return model.forward(input_ids, segment_ids, position_ids, vision, ntk_alpha=ntk_alpha)[0]
