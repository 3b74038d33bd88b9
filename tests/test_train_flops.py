"""The model FLOPs behind MFU agree with XLA's count of the same forward pass, where XLA's count
is meaningful: dense text (XLA also counts the masked half of causal attention and elementwise
work, a few percent more) and the vision towers (elementwise work weighs more at tiny widths)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.models.vision_inputs import make_vision_batch
from qwenvl_jax.train.flops import (
    delta_rule_flops_per_token,
    step_flops,
    text_forward_flops,
    v1_vision_forward_flops,
    vision_forward_flops,
)
from qwenvl_jax.train.plan import hlo_matmul_flops


def xla_flops(fn, *args) -> float:
    """XLA's FLOP count of `fn`, with the bodies of its loops (the scanned decoder layers) counted
    by their trip counts: cost analysis counts a loop body once, so its count is scaled by the
    HLO's matmul FLOPs with trip counts over those without (train/plan.py)."""
    compiled = jax.jit(fn).lower(*args).compile()
    matmuls = hlo_matmul_flops(compiled.as_text())
    assert matmuls["unknown_loops"] == 0
    return float(compiled.cost_analysis()["flops"]) * matmuls["with_trips"] / matmuls["once"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen_vl"])
def test_text_flops(family):
    cfg = load_config(f"tiny_{family}")
    graphdef, state = nnx.split(build_model(cfg, abstract=True))
    B, L = 2, 256
    ids = jnp.full((B, L), 7, jnp.int32)
    seg = jnp.ones((B, L), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L), (3, B, L))
    xla = xla_flops(
        lambda s: jnp.sum(nnx.merge(graphdef, s).forward(ids, seg, pos, None)[0]), state
    )
    t = cfg.text
    ours = text_forward_flops(t, np.array([L] * B))
    # XLA multiplies every query with every key; ours counts the causal half
    masked_half = 4 * t.num_attention_heads * t.head_dim * B * L * (L - 1) / 2 * t.num_hidden_layers
    assert 0.9 < (ours + masked_half) / xla <= 1.0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_flops(family):
    cfg = load_config(f"tiny_{family}")
    graphdef, state = nnx.split(build_model(cfg, abstract=True).visual)
    grids = np.array([[1, 8, 8], [1, 8, 8]])
    vb = make_vision_batch(
        cfg.vision, np.zeros((128, cfg.vision.patch_dim), np.float32), grids, pad_to=128
    )
    xla = xla_flops(
        lambda s, v: sum(jnp.sum(x) for x in nnx.merge(graphdef, s)(v) if x is not None), state, vb
    )
    assert 0.8 < vision_forward_flops(cfg.vision, np.array([64, 64])) / xla <= 1.0


def test_v1_vision_flops():
    cfg = load_config("tiny_qwen_vl")
    graphdef, state = nnx.split(build_model(cfg, abstract=True).visual)
    pixels = jnp.zeros((2, 3, 448, 448))
    xla = xla_flops(lambda s: jnp.sum(nnx.merge(graphdef, s)(pixels)), state)
    assert 0.8 < v1_vision_forward_flops(cfg.vision, 2) / xla <= 1.0


def test_step_counts_real_tokens_and_the_experts_used():
    cfg = load_config("tiny_qwen3_vl_moe")
    seg = np.array([[1] * 10 + [2] * 6 + [0] * 16])
    batch = {"segment_ids": seg, "input_ids": np.zeros_like(seg)}
    t = cfg.text
    # padding costs nothing; two packed samples attend within themselves
    assert step_flops(cfg, batch) == 3 * text_forward_flops(t, np.array([10, 6]))
    # each token pays for its top-k experts, not all of them
    more = cfg.replace(text=type(t)(**{**t.__dict__, "num_experts_per_tok": 3}))
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    extra = 3 * 16 * moe_layers * 6 * t.hidden_size * t.moe_intermediate_size
    assert step_flops(more, batch) - step_flops(cfg, batch) == extra


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_counts_each_projection_weight(family):
    """Qwen3.5's hybrid decoder (XLA cannot count its in-chunk loops): outside the delta rule and
    the attention scores, one token costs 2 FLOPs per weight of every projection of the built
    model (Gated DeltaNet's five, gated attention's query-and-gate, the shared expert and its
    gate, the head), the routed experts k / E of theirs; the depthwise convolution is no
    matmul."""
    cfg = load_config(f"tiny_{family}")
    t = cfg.text
    weights = 0.0
    for path, v in nnx.to_flat_state(nnx.state(build_model(cfg, abstract=True), nnx.Param)):
        names = [str(p) for p in path]
        if names[0] not in ("language_model", "lm_head") or "conv1d" in names:
            continue
        if names[-1] in ("gate_up_proj", "down_proj") and names[-2] == "mlp":  # routed experts
            weights += v.get_value().size * t.num_experts_per_tok / t.num_experts
        elif names[-1] == "kernel":
            weights += v.get_value().size
    linear = t.layer_types.count("linear_attention")
    full = t.num_hidden_layers - linear
    assert linear and full and t.attn_output_gate
    core = linear * delta_rule_flops_per_token(t) + 4 * t.num_attention_heads * t.head_dim * full
    assert text_forward_flops(t, np.array([1])) - core == pytest.approx(2 * weights, rel=1e-12)
