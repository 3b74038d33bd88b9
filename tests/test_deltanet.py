"""Gated DeltaNet (Qwen3.5's linear attention) against transformers' Qwen3_5GatedDeltaNet: the
chunked and recurrent delta rules, the layer forward, prefill then decode, left padding, packed rows
and gradients, on a tiny random layer (hidden 64, 2 key heads, 4 value heads, head dims 16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DynamicCache
from transformers.models.qwen3_5 import modeling_qwen3_5 as ref
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from qwenvl_jax.layers.deltanet import (
    DeltaNetState,
    GatedDeltaNet,
    causal_conv1d,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from qwenvl_jax.sharding import abstract_params

D, HK, HV, DK, DV, K = 64, 2, 4, 16, 16, 4


def rel(ours, want) -> float:
    ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
    return float(np.abs(ours - want).max() / np.abs(want).max())


def _config() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        hidden_size=D,
        linear_num_key_heads=HK,
        linear_num_value_heads=HV,
        linear_key_head_dim=DK,
        linear_value_head_dim=DV,
        linear_conv_kernel_dim=K,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=100,
    )


@pytest.fixture(scope="module")
def pair():
    """The reference layer with random weights (dt_bias and the norm weight moved off their
    constant initial values) and ours holding the same weights."""
    torch.manual_seed(0)
    theirs = ref.Qwen3_5GatedDeltaNet(_config(), layer_idx=0).eval()
    with torch.no_grad():
        theirs.dt_bias.copy_(torch.randn(HV) * 0.5 + 1.0)
        theirs.norm.weight.copy_(1.0 + 0.1 * torch.randn(DV))
    ours = GatedDeltaNet(
        D,
        num_key_heads=HK,
        num_value_heads=HV,
        key_head_dim=DK,
        value_head_dim=DV,
        conv_kernel_size=K,
        rngs=nnx.Rngs(1),
    )
    w = {n: p.detach().numpy() for n, p in theirs.named_parameters()}
    for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"):
        getattr(ours, name).kernel[...] = jnp.asarray(w[f"{name}.weight"].T)
    ours.conv1d.kernel[...] = jnp.asarray(w["conv1d.weight"].reshape(-1, K).T)
    ours.dt_bias[...] = jnp.asarray(w["dt_bias"])
    ours.A_log[...] = jnp.asarray(w["A_log"])
    ours.norm.weight[...] = jnp.asarray(w["norm.weight"])
    return theirs, ours


@nnx.jit
def _call(model, x, segment_ids, state=None):
    return model(x, segment_ids, state)


def _inputs(seed: int, B: int, T: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _torch_forward(theirs, x: np.ndarray, cache=None) -> np.ndarray:
    with torch.no_grad():
        return theirs(torch.from_numpy(x), cache_params=cache).numpy()


def _rule_inputs(seed: int, B: int, T: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, HK, DK)).astype(np.float32)
    k = rng.standard_normal((B, T, HK, DK)).astype(np.float32)
    v = rng.standard_normal((B, T, HV, DV)).astype(np.float32)
    g = (-np.exp(rng.standard_normal((B, T, HV))) * 0.3).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, HV))))).astype(np.float32)
    s0 = rng.standard_normal((B, HV, DK, DV)).astype(np.float32)
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 150])
def test_rule_matches_reference(form, T):
    """Each form equals transformers' torch form (L2 norm in the kernel, an initial state),
    output and final state, across chunk boundaries."""
    args = _rule_inputs(T, 2, T)
    ours_fn = chunk_gated_delta_rule if form == "chunk" else recurrent_gated_delta_rule
    ref_fn = (
        ref.torch_chunk_gated_delta_rule
        if form == "chunk"
        else ref.torch_recurrent_gated_delta_rule
    )
    q, k, v, g, beta, s0 = (torch.from_numpy(a) for a in args)
    want_o, want_s = ref_fn(
        q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    seg = jnp.ones((2, T), jnp.int32)
    o, s = ours_fn(*(jnp.asarray(a) for a in args[:5]), seg, jnp.asarray(args[5]))
    assert o.shape == (2, T, HV, DV) and s.shape == (2, HV, DK, DV) and s.dtype == jnp.float32
    assert rel(o, want_o.numpy()) < 2e-6
    assert rel(s, want_s.numpy()) < 2e-6


def test_forms_agree_on_packed_padded_rows():
    """Chunked and recurrent forms agree on rows that mix padding (left, inside, right), segment
    starts inside and across chunks, and an initial state; padding outputs are zero."""
    B, T = 3, 150
    q, k, v, g, beta, s0 = (jnp.asarray(a) for a in _rule_inputs(7, B, T))
    seg = np.ones((B, T), np.int32)
    seg[0, :10] = 0
    seg[0, 70:] = 2
    seg[0, 90:95] = 0
    seg[1, 64:] = 2
    seg[1, 100:] = 3
    seg[1, 140:] = 0
    seg[2, :] = 0  # nothing live: the state passes through
    seg = jnp.asarray(seg)
    oc, sc = chunk_gated_delta_rule(q, k, v, g, beta, seg, s0)
    orr, sr = recurrent_gated_delta_rule(q, k, v, g, beta, seg, s0)
    assert rel(oc, orr) < 2e-6 and rel(sc, sr) < 2e-6
    assert np.all(np.asarray(oc)[np.asarray(seg) == 0] == 0)
    np.testing.assert_array_equal(np.asarray(sc[2]), np.asarray(s0[2]))


def test_conv_matches_reference_and_skips_padding():
    """The causal depthwise conv equals transformers' causal_conv1d_fn on an unpadded row, and a
    row with padding (left and inside) gives the same outputs at its live positions."""
    rng = np.random.default_rng(3)
    C, T = 8, 20
    x = rng.standard_normal((1, T, C)).astype(np.float32)
    w = rng.standard_normal((C, K)).astype(np.float32)
    want = ref.causal_conv1d_fn(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(w), activation="silu"
    )
    y, state = causal_conv1d(jnp.asarray(x), jnp.asarray(w.T), jnp.ones((1, T), jnp.int32))
    assert rel(y, want.transpose(1, 2).numpy()) < 1e-6
    np.testing.assert_array_equal(np.asarray(state), x[:, -(K - 1) :])
    live = np.ones(T + 7, bool)
    live[:4] = False
    live[12:15] = False
    xp = rng.standard_normal((1, T + 7, C)).astype(np.float32)
    xp[0, live] = x[0]
    yp, state_p = causal_conv1d(jnp.asarray(xp), jnp.asarray(w.T), jnp.asarray(live[None] * 1))
    np.testing.assert_array_equal(np.asarray(yp)[0, live], np.asarray(y)[0])
    assert np.all(np.asarray(yp)[0, ~live] == 0)
    np.testing.assert_array_equal(np.asarray(state_p), np.asarray(state))
    # a last segment shorter than K-1 keeps nothing of the segment before it
    seg = jnp.asarray([[1] * (T - 2) + [2, 2]], jnp.int32)
    y2, state2 = causal_conv1d(jnp.asarray(x), jnp.asarray(w.T), seg, state)
    want2, _ = causal_conv1d(jnp.asarray(x[:, -2:]), jnp.asarray(w.T), jnp.ones((1, 2), jnp.int32))
    np.testing.assert_array_equal(np.asarray(y2)[:, -2:], np.asarray(want2))
    np.testing.assert_array_equal(np.asarray(state2)[0, 0], 0)
    np.testing.assert_array_equal(np.asarray(state2)[0, 1:], x[0, -2:])


@pytest.mark.parametrize("T", [1, 65, 150])
def test_layer_matches_reference(pair, T):
    theirs, ours = pair
    x = _inputs(T, 2, T)
    out, state = _call(ours, jnp.asarray(x), jnp.ones((2, T), jnp.int32))
    assert rel(out, _torch_forward(theirs, x)) < 1e-5
    assert isinstance(state, DeltaNetState)
    assert state.conv.shape == (2, K - 1, 2 * HK * DK + HV * DV)
    assert state.recurrent.shape == (2, HV, DK, DV) and state.recurrent.dtype == jnp.float32


def test_prefill_then_decode(pair):
    """Prefill 70 tokens, then decode 10 one at a time (jitted, the recurrent form): equals one
    forward over all 80, and transformers' own cached prefill + decode, outputs and states."""
    theirs, ours = pair
    T0, n = 70, 10
    x = _inputs(11, 2, T0 + n)
    seg = jnp.ones((2, T0 + n), jnp.int32)
    full, full_state = _call(ours, jnp.asarray(x), seg)

    out, state = _call(ours, jnp.asarray(x[:, :T0]), seg[:, :T0], None)
    steps = [out]
    for t in range(T0, T0 + n):
        out, state = _call(ours, jnp.asarray(x[:, t : t + 1]), seg[:, t : t + 1], state)
        steps.append(out)
    ours_steps = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert rel(ours_steps, full) < 1e-5
    assert rel(state.recurrent, full_state.recurrent) < 1e-5
    np.testing.assert_allclose(np.asarray(state.conv), np.asarray(full_state.conv), rtol=1e-6)

    cache = DynamicCache(config=_config())
    ref_steps = [_torch_forward(theirs, x[:, :T0], cache)]
    for t in range(T0, T0 + n):
        ref_steps.append(_torch_forward(theirs, x[:, t : t + 1], cache))
    assert rel(ours_steps, np.concatenate(ref_steps, axis=1)) < 1e-5
    assert rel(state.recurrent, cache.layers[0].recurrent_states[0].numpy()) < 1e-5
    ref_conv = cache.layers[0].conv_states[0].numpy()  # [B, conv_dim, K]: the last K inputs
    np.testing.assert_allclose(
        np.asarray(state.conv), ref_conv[:, :, 1:].transpose(0, 2, 1), rtol=1e-5, atol=1e-6
    )


def test_left_padding(pair):
    """A left-padded row (random values under the padding) equals the row alone: outputs at its
    real positions, zero at padding, the final state, and decode steps continuing from it; a decode
    step that is padding leaves the state as it was. Equal up to float32 rounding: the padding moves
    the chunk boundaries."""
    theirs, ours = pair
    L, P = 90, 13
    x = _inputs(21, 2, L + P)
    alone = x[1:, P:]
    seg = np.ones((2, L + P), np.int32)
    seg[1, :P] = 0
    out, state = _call(ours, jnp.asarray(x), jnp.asarray(seg))
    want, want_state = _call(ours, jnp.asarray(alone), jnp.ones((1, L), jnp.int32))
    assert rel(np.asarray(out)[1, P:], want[0]) < 1e-5
    assert np.all(np.asarray(out)[1, :P] == 0)
    assert rel(state.recurrent[1:], want_state.recurrent) < 1e-5
    np.testing.assert_array_equal(np.asarray(state.conv[1:]), np.asarray(want_state.conv))
    assert rel(want, _torch_forward(theirs, alone)) < 1e-5

    step = _inputs(22, 2, 1)
    out1, state1 = _call(ours, jnp.asarray(step), jnp.ones((2, 1), jnp.int32), state)
    want1, _ = _call(ours, jnp.asarray(step[1:]), jnp.ones((1, 1), jnp.int32), want_state)
    assert rel(np.asarray(out1)[1:], want1) < 1e-5
    out2, state2 = _call(ours, jnp.asarray(step), jnp.asarray([[1], [0]], jnp.int32), state1)
    assert np.all(np.asarray(out2)[1] == 0)
    np.testing.assert_array_equal(np.asarray(state2.recurrent[1]), np.asarray(state1.recurrent[1]))
    np.testing.assert_array_equal(np.asarray(state2.conv[1]), np.asarray(state1.conv[1]))


def test_packing(pair):
    """Two samples packed in one row (ids 1..., 2..., then bucket padding) equal each sample run
    alone; the row's final state is the second sample's (the first's does not leak into it)."""
    _, ours = pair
    L1, L2, P = 70, 67, 5
    x = _inputs(31, 1, L1 + L2 + P)
    seg = np.concatenate([np.full(L1, 1), np.full(L2, 2), np.zeros(P)]).astype(np.int32)[None]
    out, state = _call(ours, jnp.asarray(x), jnp.asarray(seg))
    first, _ = _call(ours, jnp.asarray(x[:, :L1]), jnp.ones((1, L1), jnp.int32))
    second, second_state = _call(
        ours, jnp.asarray(x[:, L1 : L1 + L2]), jnp.ones((1, L2), jnp.int32)
    )
    assert rel(np.asarray(out)[:, :L1], first) < 1e-5
    assert rel(np.asarray(out)[:, L1 : L1 + L2], second) < 1e-5
    assert rel(state.recurrent, second_state.recurrent) < 1e-5
    np.testing.assert_array_equal(np.asarray(state.conv), np.asarray(second_state.conv))
    # a state passed in continues into the first segment only
    _, s0 = _call(ours, jnp.asarray(_inputs(32, 1, 9)), jnp.ones((1, 9), jnp.int32))
    out_c, _ = _call(ours, jnp.asarray(x), jnp.asarray(seg), s0)
    assert rel(np.asarray(out_c)[:, L1 : L1 + L2], second) < 1e-5
    assert rel(np.asarray(out_c)[:, :L1], first) > 1e-3


def test_gradients_match_torch(pair):
    """jax.grad of a weighted sum of the outputs equals torch autograd for the projections, the
    conv, A_log, dt_bias and the norm weight; on a packed, padded batch every gradient is finite."""
    theirs, ours = pair
    T = 80
    x = _inputs(41, 2, T)
    cot = np.random.default_rng(42).standard_normal((2, T, D)).astype(np.float32)

    theirs.zero_grad()
    out = theirs(torch.from_numpy(x))
    (out * torch.from_numpy(cot)).sum().backward()
    tg = {n: p.grad.numpy() for n, p in theirs.named_parameters()}

    graphdef, params = nnx.split(ours, nnx.Param)

    def loss(params, seg):
        out, _ = nnx.merge(graphdef, params)(jnp.asarray(x), seg)
        return jnp.sum(out * cot)

    grads = jax.grad(loss)(params, jnp.ones((2, T), jnp.int32))
    assert rel(grads["in_proj_qkv"]["kernel"][...], tg["in_proj_qkv.weight"].T) < 1e-5
    assert rel(grads["conv1d"]["kernel"][...], tg["conv1d.weight"].reshape(-1, K).T) < 1e-5
    assert rel(grads["norm"]["weight"][...], tg["norm.weight"]) < 1e-5
    # The decay's parameters sum many cancelling terms: transformers' own float32 gradients of
    # A_log and dt_bias sit 1.2e-5 to 1.5e-5 (relative) from float64 ones, ours 1.5e-5 to 1.9e-5.
    assert rel(grads["in_proj_a"]["kernel"][...], tg["in_proj_a.weight"].T) < 3e-5
    assert rel(grads["A_log"][...], tg["A_log"]) < 3e-5
    assert rel(grads["dt_bias"][...], tg["dt_bias"]) < 3e-5

    seg = np.ones((2, T), np.int32)
    seg[0, :9] = 0
    seg[1, 40:] = 2
    seg[1, 75:] = 0
    grads = jax.grad(loss)(params, jnp.asarray(seg))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_real_size_shapes_and_dtypes():
    """At the 27B's linear-layer size in bfloat16 (traced, not run): a 4096-token prefill and a
    decode step give bfloat16 outputs, a bfloat16 conv state and a float32 recurrent state."""
    with abstract_params():
        layer = GatedDeltaNet(
            5120,
            num_key_heads=16,
            num_value_heads=48,
            key_head_dim=128,
            value_head_dim=128,
            dtype=jnp.bfloat16,
            param_dtype=jnp.bfloat16,
            rngs=None,
        )
    graphdef, params = nnx.split(layer)

    def run(params, x, seg, state):
        return nnx.merge(graphdef, params)(x, seg, state)

    B, T = 2, 4096
    x = jax.ShapeDtypeStruct((B, T, 5120), jnp.bfloat16)
    out, state = jax.eval_shape(run, params, x, jax.ShapeDtypeStruct((B, T), jnp.int32), None)
    assert out.shape == (B, T, 5120) and out.dtype == jnp.bfloat16
    assert state.conv.shape == (B, 3, 2 * 16 * 128 + 48 * 128) and state.conv.dtype == jnp.bfloat16
    assert state.recurrent.shape == (B, 48, 128, 128) and state.recurrent.dtype == jnp.float32
    x1 = jax.ShapeDtypeStruct((B, 1, 5120), jnp.bfloat16)
    out1, state1 = jax.eval_shape(run, params, x1, jax.ShapeDtypeStruct((B, 1), jnp.int32), state)
    assert out1.shape == (B, 1, 5120) and out1.dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state1) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
