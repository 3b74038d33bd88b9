"""Checkpoint key <-> parameter path table of Qwen-VL v1, used both ways.

The original checkpoint (`QWenLMHeadModel` state dict) fuses tensors that our modules keep apart,
so each entry has a layout kind:
- `T`: a torch Linear weight [out, in], our kernel [in, out];
- `SAME`: stored as is (norm weights, embeddings, position tables, and `visual.proj`, which the
  original applies as `x @ proj`, already our kernel layout);
- `CONV`: the bias-free Conv2d weight [W, 3, P, P], our kernel [3*P*P, W];
- `SPLIT_T` / `SPLIT`: a weight (or bias) packing q, k and v in [Q; K; V] row blocks: the LLM's
  `c_attn` and the resampler's nn.MultiheadAttention `in_proj_weight`.
The ViT's `in_proj` stays in its per-head interleaved layout (our kernel is its transpose).
Export yields the keys in the original state-dict order, in the original layouts, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading.mapping import Mapping

SAME, T, CONV, SPLIT_T, SPLIT = "same", "t", "conv", "split_t", "split"


@dataclass(frozen=True)
class Entry:
    hub: str  # checkpoint key template, "{i}" = layer index
    kind: str
    ours: tuple[str, ...]  # parameter path template(s), one per packed part


def _e(hub: str, kind: str, *ours: str) -> Entry:
    return Entry(hub, kind, ours)


_LM = "language_model.layers.{i}"
LLM_LAYER = (
    _e("transformer.h.{i}.ln_1.weight", SAME, f"{_LM}.input_layernorm.weight"),
    _e(
        "transformer.h.{i}.attn.c_attn.weight",
        SPLIT_T,
        *(f"{_LM}.self_attn.{n}_proj.kernel" for n in "qkv"),
    ),
    _e(
        "transformer.h.{i}.attn.c_attn.bias",
        SPLIT,
        *(f"{_LM}.self_attn.{n}_proj.bias" for n in "qkv"),
    ),
    _e("transformer.h.{i}.attn.c_proj.weight", T, f"{_LM}.self_attn.o_proj.kernel"),
    _e("transformer.h.{i}.ln_2.weight", SAME, f"{_LM}.post_attention_layernorm.weight"),
    _e("transformer.h.{i}.mlp.w1.weight", T, f"{_LM}.mlp.up_proj.kernel"),
    _e("transformer.h.{i}.mlp.w2.weight", T, f"{_LM}.mlp.gate_proj.kernel"),
    _e("transformer.h.{i}.mlp.c_proj.weight", T, f"{_LM}.mlp.down_proj.kernel"),
)
_V, _B = "transformer.visual", "transformer.visual.transformer.resblocks.{i}"
VIT_STEM = (
    _e(f"{_V}.positional_embedding", SAME, "visual.positional_embedding"),
    _e(f"{_V}.proj", SAME, "visual.proj"),
    _e(f"{_V}.conv1.weight", CONV, "visual.conv1.kernel"),
    _e(f"{_V}.ln_pre.weight", SAME, "visual.ln_pre.weight"),
    _e(f"{_V}.ln_pre.bias", SAME, "visual.ln_pre.bias"),
)
VIT_BLOCK = (
    _e(f"{_B}.ln_1.weight", SAME, "visual.resblocks.{i}.ln_1.weight"),
    _e(f"{_B}.ln_1.bias", SAME, "visual.resblocks.{i}.ln_1.bias"),
    _e(f"{_B}.ln_2.weight", SAME, "visual.resblocks.{i}.ln_2.weight"),
    _e(f"{_B}.ln_2.bias", SAME, "visual.resblocks.{i}.ln_2.bias"),
    _e(f"{_B}.attn.in_proj.weight", T, "visual.resblocks.{i}.attn.in_proj.kernel"),
    _e(f"{_B}.attn.in_proj.bias", SAME, "visual.resblocks.{i}.attn.in_proj.bias"),
    _e(f"{_B}.attn.out_proj.weight", T, "visual.resblocks.{i}.attn.out_proj.kernel"),
    _e(f"{_B}.attn.out_proj.bias", SAME, "visual.resblocks.{i}.attn.out_proj.bias"),
    _e(f"{_B}.mlp.c_fc.weight", T, "visual.resblocks.{i}.mlp.fc1.kernel"),
    _e(f"{_B}.mlp.c_fc.bias", SAME, "visual.resblocks.{i}.mlp.fc1.bias"),
    _e(f"{_B}.mlp.c_proj.weight", T, "visual.resblocks.{i}.mlp.fc2.kernel"),
    _e(f"{_B}.mlp.c_proj.bias", SAME, "visual.resblocks.{i}.mlp.fc2.bias"),
)
_P, _AP = f"{_V}.attn_pool", "visual.attn_pool"
RESAMPLER = (
    _e(f"{_P}.pos_embed", SAME, f"{_AP}.pos_embed"),
    _e(f"{_P}.query", SAME, f"{_AP}.query"),
    _e(f"{_P}.kv_proj.weight", T, f"{_AP}.kv_proj.kernel"),
    _e(f"{_P}.attn.in_proj_weight", SPLIT_T, *(f"{_AP}.attn.{n}_proj.kernel" for n in "qkv")),
    _e(f"{_P}.attn.in_proj_bias", SPLIT, *(f"{_AP}.attn.{n}_proj.bias" for n in "qkv")),
    _e(f"{_P}.attn.out_proj.weight", T, f"{_AP}.attn.out_proj.kernel"),
    _e(f"{_P}.attn.out_proj.bias", SAME, f"{_AP}.attn.out_proj.bias"),
    _e(f"{_P}.ln_q.weight", SAME, f"{_AP}.ln_q.weight"),
    _e(f"{_P}.ln_q.bias", SAME, f"{_AP}.ln_q.bias"),
    _e(f"{_P}.ln_kv.weight", SAME, f"{_AP}.ln_kv.weight"),
    _e(f"{_P}.ln_kv.bias", SAME, f"{_AP}.ln_kv.bias"),
    _e(f"{_V}.ln_post.weight", SAME, "visual.ln_post.weight"),
    _e(f"{_V}.ln_post.bias", SAME, "visual.ln_post.bias"),
)
EMBED = _e("transformer.wte.weight", SAME, "language_model.embed_tokens.embedding")
FINAL_NORM = _e("transformer.ln_f.weight", SAME, "language_model.norm.weight")
LM_HEAD = _e("lm_head.weight", T, "lm_head.kernel")


def _fill(template: str, i: int | str | None) -> str:
    return template if i is None else template.replace("{i}", str(i))


class V1Mapping(Mapping):
    """The `Mapping` of family "qwen_vl" (see loading/mapping.py for the interface)."""

    family = "qwen_vl"

    def __init__(self, config: ModelConfig):
        v = config.vision
        self.conv_shape = (v.width, 3, v.patch_size, v.patch_size)
        self.tied = config.text.tie_word_embeddings
        # State-dict order of the original QWenLMHeadModel.
        self.layout: list[tuple[tuple[Entry, ...], int | None]] = [
            ((EMBED,), None),
            *[(LLM_LAYER, i) for i in range(config.text.num_hidden_layers)],
            ((FINAL_NORM,), None),
            (VIT_STEM, None),
            *[(VIT_BLOCK, i) for i in range(v.layers)],
            (RESAMPLER, None),
            ((LM_HEAD,), None),
        ]
        every = (EMBED, FINAL_NORM, LM_HEAD, *LLM_LAYER, *VIT_STEM, *VIT_BLOCK, *RESAMPLER)
        self._import: list[tuple[re.Pattern, Entry]] = [
            (re.compile("^" + re.escape(e.hub).replace(r"\{i\}", r"(\d+)") + "$"), e) for e in every
        ]

    # ------------------------------------------------------------------ checkpoint -> params
    def import_tensor(
        self, key: str, array: np.ndarray, target_shape: Callable[[str], tuple]
    ) -> list[tuple[str, np.ndarray]]:
        for pattern, entry in self._import:
            m = pattern.match(key)
            if m is None:
                continue
            paths = [_fill(p, m.group(1) if m.groups() else None) for p in entry.ours]
            parts = self._to_ours(entry.kind, np.asarray(array), len(paths), key)
            out = list(zip(paths, parts))
            for path, part in out:
                expected = tuple(target_shape(path))
                if tuple(part.shape) != expected:
                    raise CheckpointError(
                        f"checkpoint tensor {key!r} of shape {tuple(array.shape)} does not fit "
                        f"parameter {path} of shape {expected}"
                    )
            return out
        raise CheckpointError(f"checkpoint key {key!r} maps to no parameter of qwen_vl")

    @staticmethod
    def _to_ours(kind: str, a: np.ndarray, n: int, key: str) -> list[np.ndarray]:
        if kind == SAME:
            return [a]
        if kind == T:
            return [a.T]
        if kind == CONV:
            return [a.reshape(a.shape[0], -1).T]
        if a.shape[0] % n:
            raise CheckpointError(
                f"checkpoint tensor {key!r} of shape {a.shape} does not pack {n} equal q/k/v blocks"
            )
        blocks = np.split(a, n, axis=0)
        return [b.T for b in blocks] if kind == SPLIT_T else blocks

    # ------------------------------------------------------------------ params -> checkpoint
    def export_tensors(self, params: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        used = set()
        for entries, i in self.layout:
            for entry in entries:
                if entry is LM_HEAD and self.tied:
                    continue
                paths = [_fill(p, i) for p in entry.ours]
                missing = [p for p in paths if p not in params]
                if missing:
                    raise CheckpointError(
                        f"parameter {missing[0]} is missing (needed for {_fill(entry.hub, i)})"
                    )
                used.update(paths)
                parts = [np.asarray(params[p]) for p in paths]
                yield _fill(entry.hub, i), np.ascontiguousarray(self._to_hub(entry.kind, parts))
        extra = sorted(set(params) - used)
        if extra:
            raise CheckpointError(f"parameter {extra[0]} has no checkpoint name in qwen_vl")

    def _to_hub(self, kind: str, parts: list[np.ndarray]) -> np.ndarray:
        if kind == SAME:
            return parts[0]
        if kind == T:
            return parts[0].T
        if kind == CONV:
            return parts[0].T.reshape(self.conv_shape)
        if kind == SPLIT_T:
            return np.concatenate([p.T for p in parts], axis=0)
        return np.concatenate(parts, axis=0)
