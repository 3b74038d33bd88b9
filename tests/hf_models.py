"""Tiny random transformers models of each family, and inputs shaped as their processors give them.

Used by the parity tests as the reference implementation. Only tests import torch/transformers.
"""

from __future__ import annotations

import numpy as np
import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# Qwen3.5: a hybrid pattern that is not every fourth layer, more value heads than key heads.
QWEN3_5_LAYERS = [
    "linear_attention",
    "full_attention",
    "linear_attention",
    "linear_attention",
    "full_attention",
]

# Small vocabulary with the vision special tokens moved inside it.
SMALL_VOCAB = dict(
    vocab_size=512,
    image_token_id=500,
    video_token_id=501,
    vision_start_token_id=502,
    vision_end_token_id=503,
)
REAL_VOCAB = dict(
    vocab_size=151936,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)


def hf_config(family: str, *, vocab=SMALL_VOCAB, tie: bool = False, deepstack=(0, 1)):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ids = {k: v for k, v in vocab.items() if k != "vocab_size"}
    if family == "qwen2_vl":
        text = dict(
            vocab_size=vocab["vocab_size"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            max_position_embeddings=4096,
        )
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    if family == "qwen2_5_vl":
        text = dict(
            vocab_size=vocab["vocab_size"],
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            max_position_embeddings=4096,
        )
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            in_channels=3,
            hidden_act="silu",
        )
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids
        )
    if family.startswith("qwen3_5"):
        return _qwen3_5_config(family, vocab, tie)
    moe = family == "qwen3_vl_moe"
    text = dict(
        vocab_size=vocab["vocab_size"],
        hidden_size=128 if moe else 64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=128 if moe else 64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=36,
        deepstack_visual_indexes=list(deepstack),
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
    )
    if moe:
        text.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
        return Qwen3VLMoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids
        )
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def _qwen3_5_config(family: str, vocab, tie: bool):
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    ids = {k: v for k, v in vocab.items() if k != "vocab_size"}
    moe = family == "qwen3_5_moe"
    text = dict(
        vocab_size=vocab["vocab_size"],
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=len(QWEN3_5_LAYERS),
        layer_types=list(QWEN3_5_LAYERS),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        mtp_num_hidden_layers=1,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=36,
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
    )
    if moe:
        del text["intermediate_size"]
        text.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,  # 2I != D: the fused experts' layout is unambiguous
            shared_expert_intermediate_size=48,
        )
        return Qwen3_5MoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids
        )
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def hf_model(family: str, seed: int = 0, **kw):
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    cls = {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
        "qwen3_5": Qwen3_5ForConditionalGeneration,
        "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration,
    }[family]
    torch.manual_seed(seed)
    model = cls(hf_config(family, **kw)).eval().float()
    # Random init leaves norms at 1 and biases at 0; perturb everything so that layout mistakes
    # (a missing bias, a swapped norm) move the logits.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name or "ln_" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif "experts" in name or "embed" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5) * 4)
    return model


def patch_size(family: str) -> int:
    return 16 if family.startswith("qwen3") else 14


def fake_pixels(family: str, grid: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random normalised patches float32[t*h*w, 3*2*P*P] for a grid (t, h, w) of patches."""
    t, h, w = grid
    P = patch_size(family)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((t * h * w, 3 * 2 * P * P)).astype(np.float32)


def build_inputs(
    family: str, prompts: list[dict], vocab=SMALL_VOCAB, seed: int = 0, pad_side: str = "left"
):
    """prompts: [{"text": [int, ...] (plain text ids), "images": [(h, w) grids in patches],
    "videos": [(t, h, w)]}]. Builds input_ids with vision_start + N pads + vision_end per item
    (Qwen3 videos: one block per temporal patch, separated by text ids), padded into a batch."""
    vs, ve = vocab["vision_start_token_id"], vocab["vision_end_token_id"]
    img_tok, vid_tok = vocab["image_token_id"], vocab["video_token_id"]
    rows, types, pix, grids, vpix, vgrids = [], [], [], [], [], []
    rng = np.random.default_rng(seed)
    for p in prompts:
        ids, tt = [], []
        text = list(p.get("text", []))
        half = len(text) // 2
        ids += text[:half]
        tt += [0] * half
        for h, w in p.get("images", []):
            n = h * w // 4
            ids += [vs] + [img_tok] * n + [ve]
            tt += [0] + [1] * n + [0]
            grids.append((1, h, w))
            pix.append(fake_pixels(family, (1, h, w), int(rng.integers(1 << 30))))
        for t, h, w in p.get("videos", []):
            n = h * w // 4
            if family.startswith("qwen3"):
                for k in range(t):
                    stamp = [7 + k, 9]  # stands for "<k.5 seconds>"
                    ids += stamp + [vs] + [vid_tok] * n + [ve]
                    tt += [0, 0, 0] + [2] * n + [0]
            else:
                ids += [vs] + [vid_tok] * (t * n) + [ve]
                tt += [0] + [2] * (t * n) + [0]
            vgrids.append((t, h, w))
            vpix.append(fake_pixels(family, (t, h, w), int(rng.integers(1 << 30))))
        ids += text[half:]
        tt += [0] * (len(text) - half)
        rows.append(ids)
        types.append(tt)
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = np.zeros((B, T), np.int64)
    mask = np.zeros((B, T), np.int64)
    mm = np.zeros((B, T), np.int64)
    for b, (r, t) in enumerate(zip(rows, types)):
        sl = slice(T - len(r), T) if pad_side == "left" else slice(0, len(r))
        input_ids[b, sl], mask[b, sl], mm[b, sl] = r, 1, t
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if grids:
        out["pixel_values"] = np.concatenate(pix)
        out["image_grid_thw"] = np.asarray(grids, np.int64)
    if vgrids:
        out["pixel_values_videos"] = np.concatenate(vpix)
        out["video_grid_thw"] = np.asarray(vgrids, np.int64)
    return out


def hf_logits(model, inputs: dict) -> np.ndarray:
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if "second_per_grid_ts" in inputs:
        kw["second_per_grid_ts"] = torch.tensor(inputs["second_per_grid_ts"], dtype=torch.float32)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def rel_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Largest difference over the masked positions, relative to the reference's largest value
    (at least 1)."""
    m = mask.astype(bool)
    return float(np.abs(ours - ref)[m].max() / max(1.0, np.abs(ref[m]).max()))
