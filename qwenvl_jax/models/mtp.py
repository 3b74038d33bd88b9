"""Qwen3.5's multi-token-prediction (MTP) weights, carried but not run.

The released checkpoints hold `mtp.*` tensors: `fc` (the concatenated, normalised embedding and
hidden state [2D] down to D), the norms `pre_fc_norm_embedding`, `pre_fc_norm_hidden` and `norm`,
and `mtp_num_hidden_layers` full-attention decoder layers (sparse in the MoE models); they share
the main model's embeddings and lm_head. transformers drops them; we keep them so that conversion
HF -> Orbax -> HF loses nothing and speculative decoding can use them later. Their variables are
`CarriedParam`, not `nnx.Param`: loaded, sharded, saved and exported as parameters are, but not
counted by `param_count` and not trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from flax import nnx

from qwenvl_jax.config import ModelConfig, TextConfig
from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.norms import RMSNorm
from qwenvl_jax.models.text import DecoderLayer
from qwenvl_jax.sharding import param_kind


class CarriedParam(nnx.Variable):
    """A checkpoint weight the model stores and writes back without using it."""


class MultiTokenPredictor(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None):
        D = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(
            eps=cfg.rms_norm_eps,
            param_dtype=param_dtype,
            zero_centered=cfg.norm_zero_centered,
            rngs=rngs,
        )
        kind = ("full_attention", cfg.num_experts > 0)
        with param_kind(CarriedParam):
            self.fc = Linear(2 * D, D, axes=(None, "embed"), **kw)
            self.pre_fc_norm_embedding = RMSNorm(D, **nkw)
            self.pre_fc_norm_hidden = RMSNorm(D, **nkw)
            self.norm = RMSNorm(D, **nkw)
            self.layers = nnx.List(
                [DecoderLayer(cfg, kind, **kw) for _ in range(cfg.mtp_num_hidden_layers)]
            )


def fit_mtp(config: ModelConfig, names: Iterable[str]) -> ModelConfig:
    """`config` without MTP layers when a checkpoint's tensor or parameter `names` hold no
    `mtp.*` entry (a checkpoint saved by transformers, which drops them): the model then has
    exactly the checkpoint's weights, and conversion writes back what it read."""
    if config.text.mtp_num_hidden_layers and not any(n.startswith("mtp.") for n in names):
        return config.replace(text=dataclasses.replace(config.text, mtp_num_hidden_layers=0))
    return config
