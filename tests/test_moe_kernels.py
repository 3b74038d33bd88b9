"""Each implementation of the experts equals the `jax.lax.ragged_dot` path in float32 (1e-5
relative), forward and gradients, including experts that receive no tokens, and SparseMoE compiles
the tiled loop for CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.layers.moe import SparseMoE, experts_ragged, experts_tiled

jax.config.update("jax_default_matmul_precision", "highest")

D, I, E = 48, 40, 8  # noqa: E741


def close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def routing(n: int, k: int, kind: str, rng) -> np.ndarray:
    """int[n, k] distinct experts per token."""
    if kind == "some_empty":  # experts 1, 4 and 5 get nothing
        pool = np.array([0, 2, 3, 6, 7])
    elif kind == "one_busy":  # expert 3 in every token: its rows span several tiles
        rest = rng.permuted(np.tile(np.array([0, 1, 2, 4, 5, 6, 7]), (n, 1)), axis=1)
        return np.concatenate([np.full((n, 1), 3), rest[:, : k - 1]], axis=1)
    else:
        pool = np.arange(E)
    return np.stack([rng.choice(pool, k, replace=False) for _ in range(n)])


CASES = [  # (tokens, top-k, routing)
    (1, 2, "some_empty"),  # a decoding step
    (5, 4, "uniform"),
    (37, 2, "some_empty"),
    (300, 4, "one_busy"),
    (700, 3, "some_empty"),
]


@pytest.mark.parametrize("n,k,kind", CASES)
def test_tiled_equals_ragged(n, k, kind):
    rng = np.random.default_rng(n * 10 + k)
    experts = jnp.asarray(routing(n, k, kind, rng), jnp.int32)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    w_gu = jnp.asarray(rng.standard_normal((E, D, 2 * I)) * 0.1, jnp.float32)
    w_d = jnp.asarray(rng.standard_normal((E, I, D)) * 0.1, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((n, k, D)), jnp.float32)

    results = {}
    for name, f in (("ragged", experts_ragged), ("tiled", experts_tiled)):
        fn = jax.jit(lambda x, a, b, f=f: f(x, experts, a, b, act="silu"))
        y, vjp = jax.vjp(fn, x, w_gu, w_d)
        results[name] = (y, *vjp(cot))
    for a, b in zip(results["tiled"], results["ragged"], strict=True):
        close(a, b)

    unused = np.setdiff1d(np.arange(E), np.asarray(experts))
    _, _, dw_gu, dw_d = results["tiled"]
    if kind == "some_empty":
        assert {1, 4, 5} <= set(unused.tolist())
    assert not np.asarray(dw_gu)[unused].any() and not np.asarray(dw_d)[unused].any()
    assert np.asarray(dw_gu)[np.unique(np.asarray(experts))].any(axis=(1, 2)).all()


def test_sparse_moe_module_equals_ragged_and_compiles_the_loop_for_cpu():
    """The module (router, top-k, weighting) on CPU against the ragged_dot experts, gradients of
    every parameter included; the CPU program is the tile loop, not ragged_dot's dense
    expansion."""
    moe = SparseMoE(D, I, E, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 50, D))
    graph, params = nnx.split(moe)

    def loss(params, x, ragged: bool):
        m = nnx.merge(graph, params)
        if not ragged:
            out, logits = m(x)
        else:
            flat = x.reshape(-1, D)
            logits = m.gate(flat)
            probs = jax.nn.softmax(logits, axis=-1)
            w, sel = jax.lax.top_k(probs, 3)
            w = w / w.sum(-1, keepdims=True)
            y = experts_ragged(flat, sel, m.gate_up_proj[...], m.down_proj[...], act="silu")
            out = jnp.sum(y * w[..., None], axis=1).reshape(x.shape)
        return jnp.sum(jnp.sin(out)) + jnp.sum(logits**2)

    got = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, x, False)
    want = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, x, True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(a, b)

    hlo = jax.jit(lambda p, x: nnx.merge(graph, p)(x)).lower(params, x).as_text()
    assert "while" in hlo
    assert "ragged" not in hlo
