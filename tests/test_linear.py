"""`layers.linear.matmul`: one 2-D product over the merged leading dimensions when the program is
traced for CPU (where it runs faster), the product as written for other platforms; the same
values and gradients either way."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.layers.linear import matmul
from qwenvl_jax.sharding import make_mesh, target_platform, use_mesh


def _dot_ranks(f, *args) -> list[int]:
    """The operand ranks of every dot_general in f's jaxpr (gradients included)."""
    jaxpr = jax.make_jaxpr(f)(*args)
    out = []

    def visit(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                out.append(eqn.invars[0].aval.ndim)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return out


def _loss(x, w):
    return jnp.sum(jnp.sin(matmul(x, w)))


def test_cpu_gets_one_2d_product_with_the_same_values_and_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    assert target_platform() == "cpu"
    with use_mesh(make_mesh(devices=jax.devices()[:1])):
        assert target_platform() == "cpu"
        ranks = _dot_ranks(jax.grad(_loss, argnums=(0, 1)), x, w)
        y = matmul(x, w)
        grads = jax.grad(_loss, argnums=(0, 1))(x, w)
    assert ranks and set(ranks) == {2}  # forward and both gradients
    plain = jnp.dot(x, w)
    np.testing.assert_allclose(y, plain, rtol=1e-6, atol=1e-6)
    assert y.shape == (3, 5, 8)

    def plain_loss(x, w):
        return jnp.sum(jnp.sin(jnp.dot(x, w)))

    for ours, ref in zip(grads, jax.grad(plain_loss, argnums=(0, 1))(x, w), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_a_tpu_mesh_keeps_the_product_as_written(v5p_mesh):
    assert target_platform() == "tpu"
    x = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 8), jnp.float32)
    ranks = _dot_ranks(jax.grad(_loss, argnums=(0, 1)), x, w)
    assert 3 in ranks
