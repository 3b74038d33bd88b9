"""Checkpoint key <-> parameter path table of Qwen-VL v1, used both ways.

The original checkpoint (`QWenLMHeadModel` state dict) fuses tensors that our modules keep apart,
so each entry has a layout kind (the kinds of loading/mapping.py):
- `T`: a torch Linear weight [out, in], our kernel [in, out];
- `SAME`: stored as is (norm weights, embeddings, position tables, and `visual.proj`, which the
  original applies as `x @ proj`, already our kernel layout);
- `conv`: the bias-free Conv2d weight [W, 3, P, P], our kernel [3*P*P, W];
- `SPLIT_T` / `SPLIT`: a weight (or bias) packing q, k and v in [Q; K; V] row blocks: the LLM's
  `c_attn` and the resampler's nn.MultiheadAttention `in_proj_weight`.
The ViT's `in_proj` stays in its per-head interleaved layout (our kernel is its transpose).
Export yields the keys in the original state-dict order, in the original layouts, bit for bit.
"""

from __future__ import annotations

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.loading.mapping import SAME, SPLIT, SPLIT_T, Entry, T, TableMapping, conv
from qwenvl_jax.loading.mapping import entry as _e

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


def vit_stem(patch_size: int) -> tuple[Entry, ...]:
    return (
        _e(f"{_V}.positional_embedding", SAME, "visual.positional_embedding"),
        _e(f"{_V}.proj", SAME, "visual.proj"),
        _e(f"{_V}.conv1.weight", conv((3, patch_size, patch_size)), "visual.conv1.kernel"),
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


class V1Mapping(TableMapping):
    """The `Mapping` of family "qwen_vl" (see loading/mapping.py for the interface)."""

    def __init__(self, config: ModelConfig):
        v = config.vision
        lm_head = [] if config.text.tie_word_embeddings else [((LM_HEAD,), None)]
        # State-dict order of the original QWenLMHeadModel.
        super().__init__(
            "qwen_vl",
            [
                ((EMBED,), None),
                *[(LLM_LAYER, i) for i in range(config.text.num_hidden_layers)],
                ((FINAL_NORM,), None),
                (vit_stem(v.patch_size), None),
                *[(VIT_BLOCK, i) for i in range(v.layers)],
                (RESAMPLER, None),
                *lm_head,
            ],
        )
