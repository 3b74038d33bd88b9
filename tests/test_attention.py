"""The blocked (flash-style, block-skipping) attention equals the dense pass, values and
gradients, for ViT-like segment layouts, packed causal rows, left padding and GQA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.layers.attention import dot_product_attention


def _segments(rng, B, L, causal):
    rows = []
    for _ in range(B):
        lengths, total = [], 0
        while total < L:
            n = int(rng.integers(1, L // 2 + 2))
            lengths.append(min(n, L - total))
            total += lengths[-1]
        seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        pad = int(rng.integers(0, L // 4))
        if causal:  # generation-style left padding
            seg[:pad] = 0
        else:  # bucket padding at the end
            seg[L - pad :] = 0
        rows.append(seg)
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_equals_dense(causal):
    rng = np.random.default_rng(int(causal))
    B, L, H, K, D = 2, 300, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, h, D)), jnp.float32) for h in (H, K, K))
    seg = _segments(rng, B, L, causal)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=causal)

    def run(dense_max, block):
        def f(q, k, v):
            return dot_product_attention(q, k, v, **kw, dense_max=dense_max, block=block)

        out = f(q, k, v)
        live = (seg != 0)[:, :, None, None]
        grads = jax.grad(lambda *a: jnp.sum(jnp.where(live, f(*a), 0) ** 2), (0, 1, 2))(q, k, v)
        return out, grads

    dense, dgrads = run(10_000, 512)
    blocked, bgrads = run(0, 64)
    live = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(blocked)[live], np.asarray(dense)[live], atol=2e-6)
    for a, b in zip(bgrads, dgrads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_blocked_skips_blocks_of_other_segments():
    """Eight images of 256 patches in 64-patch blocks: block-diagonal work only. A query block
    sees exactly its own image; the result equals attending each image alone."""
    rng = np.random.default_rng(0)
    n, L, D = 8, 256, 16
    x = jnp.asarray(rng.standard_normal((1, n * L, 2, D)), jnp.float32)
    seg = jnp.repeat(jnp.arange(1, n + 1), L)[None]
    out = dot_product_attention(
        x, x, x, q_segment_ids=seg, kv_segment_ids=seg, causal=False, dense_max=0, block=64
    )
    for i in range(n):
        xi = x[:, i * L : (i + 1) * L]
        one = jnp.ones((1, L), jnp.int32)
        alone = dot_product_attention(
            xi, xi, xi, q_segment_ids=one, kv_segment_ids=one, causal=False
        )
        np.testing.assert_allclose(out[:, i * L : (i + 1) * L], alone, atol=2e-6)


def test_blocked_backward_keeps_no_score_blocks():
    """Training memory of a long sequence: the gradient's temporaries stay within a few score
    blocks (the backward recomputes them), where saving every visited block would need
    (8192 / 512)^2 blocks of 4 heads x 512 x 512 float32 = 1 GiB."""
    B, L, H, D = 1, 8192, 4, 16
    x = jax.ShapeDtypeStruct((B, L, H, D), jnp.float32)
    seg = jnp.ones((B, L), jnp.int32)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        return jnp.sum(out**2)

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
    block = H * 512 * 512 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 16 * block
