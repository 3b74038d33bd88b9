"""Model FLOPs of a train step, counted from the config and the batch: the numerator of MFU.

Counted as 3x the forward pass (the forward, and a backward twice its size), the usual
convention, whatever is frozen. The forward counts every matmul (2 FLOPs per multiply-add) of the
tokens actually present: decoder projections and MLP (for MoE the router and the top-k experts
each token uses, not all experts, plus Qwen3.5's shared expert), the attention scores and
weighted sums over each packed sample's causal context (full-attention layers; Qwen3.5's Gated
DeltaNet layers count their projections and their chunked delta rule), the output head, and the
vision side (patch embedding, ViT blocks with attention within each image or frame, the merger;
Qwen-VL v1's ViT and resampler per image). XLA's cost analysis is no substitute here: it counts
a grouped (`ragged_dot`) expert matmul as if every token went through every expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenvl_jax.config import ModelConfig, TextConfig, V1VisionConfig, VisionConfig


def _segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Lengths of the non-zero segments of each row of int[B, T] (or of one row int[N])."""
    seg = np.atleast_2d(np.asarray(segment_ids))
    out = []
    for row in seg:
        ids, counts = np.unique(row[row > 0], return_counts=True)
        out.append(counts)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def delta_rule_flops_per_token(t: TextConfig, chunk: int = 64) -> float:
    """FLOPs per token of one Gated DeltaNet layer's delta rule in its chunked form (both
    qwenvl_jax and transformers compute chunks of 64), per value head: the causal half of the
    in-chunk products q k^T, (beta k) k^T, the triangular inverse applied to [v | k] and the
    in-chunk attention times the new values; the inverse itself (C^3 / 3 multiply-adds a chunk);
    and three products with the d_k x d_v state (read, output, write)."""
    dk, dv, C = t.linear_key_head_dim, t.linear_value_head_dim, chunk
    per_head = (C + 1) * (3 * dk + 2 * dv) + 2 * C * C / 3 + 6 * dk * dv
    return t.linear_num_value_heads * per_head


def text_forward_flops(t: TextConfig, lengths: np.ndarray) -> float:
    """Decoder + head forward FLOPs over samples of the given lengths."""
    D, H, K, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    tokens = float(np.sum(lengths))
    per_token = 0.0
    full = 0
    for i in range(t.num_hidden_layers):
        if t.layer_type(i) == "linear_attention":  # Gated DeltaNet
            kd = t.linear_num_key_heads * t.linear_key_head_dim
            vd = t.linear_num_value_heads * t.linear_value_head_dim
            # in_proj_qkv, in_proj_z, in_proj_a and _b (one per value head), out_proj
            per_token += 2 * D * (2 * kd + 2 * vd + 2 * t.linear_num_value_heads) + 2 * vd * D
            per_token += delta_rule_flops_per_token(t)
        else:
            full += 1
            q = H * hd * (2 if t.attn_output_gate else 1)  # gated: [query | gate]
            per_token += 2 * D * (q + 2 * K * hd) + 2 * H * hd * D  # q, k, v, o
        if t.is_moe_layer(i):
            experts = t.num_experts_per_tok * 6 * D * t.moe_intermediate_size
            per_token += 2 * D * t.num_experts + experts
            if t.shared_expert_intermediate_size:  # and its gate
                per_token += 6 * D * t.shared_expert_intermediate_size + 2 * D
        else:
            per_token += 6 * D * t.intermediate_size
    per_token += 2 * D * t.vocab_size
    # causal attention: token j of a sample attends j + 1 keys; scores and weighted sum
    pairs = float(np.sum(lengths * (lengths + 1) / 2))
    return per_token * tokens + 4 * H * hd * pairs * full


def vision_forward_flops(v: VisionConfig, frame_lengths: np.ndarray) -> float:
    """Native-resolution ViT + merger forward FLOPs over frames of the given patch counts."""
    W, I = v.hidden_size, v.intermediate_size
    patches = float(np.sum(frame_lengths))
    mlp = (6 if v.gated_mlp else 4) * W * I
    per_patch = 2 * v.patch_dim * W + v.depth * (2 * W * 3 * W + 2 * W * W + mlp)
    attention = 4 * W * float(np.sum(frame_lengths.astype(np.float64) ** 2)) * v.depth
    wide = W * v.spatial_merge_size**2
    merged = patches / v.spatial_merge_size**2
    merger = merged * (2 * wide * wide + 2 * wide * v.out_hidden_size)
    return per_patch * patches + attention + merger * (1 + len(v.deepstack_visual_indexes))


def v1_vision_forward_flops(v: V1VisionConfig, images: int) -> float:
    """Qwen-VL v1 ViT + resampler forward FLOPs for `images` pictures."""
    W, D, Q = v.width, v.output_dim, v.n_queries
    n = v.grid**2
    vit = (
        n
        * (
            2 * 3 * v.patch_size**2 * W
            + v.layers * (2 * W * 3 * W + 2 * W * W + 4 * W * v.mlp_width)
        )
        + 4 * W * n * n * v.layers
    )
    resampler = (
        n * 2 * W * D + n * 2 * D * 2 * D + Q * 2 * D * 2 * D + 4 * D * Q * n + Q * 2 * D * D
    )
    return images * (vit + resampler)


def step_flops(config: ModelConfig, batch: Mapping[str, Any]) -> float:
    """Model FLOPs of one train step (forward + backward) on a host batch of the contract."""
    fwd = text_forward_flops(config.text, _segment_lengths(batch["segment_ids"]))
    if isinstance(config.vision, V1VisionConfig):
        images = int(np.sum(np.asarray(batch["input_ids"]) == config.vision.image_start_id))
        fwd += v1_vision_forward_flops(config.vision, images)
    elif "vision.segment_ids" in batch:
        fwd += vision_forward_flops(config.vision, _segment_lengths(batch["vision.segment_ids"]))
    return 3.0 * fwd


__all__ = [
    "delta_rule_flops_per_token",
    "step_flops",
    "text_forward_flops",
    "v1_vision_forward_flops",
    "vision_forward_flops",
]
