"""The Pallas TPU kernels of the chunked gated delta rule's cross-chunk recurrence (deltanet_tpu)
equal the JAX scan in float32 (1e-5 relative), outputs, final state and gradients, run here in
Pallas interpret mode; sizes the kernels cannot tile take the scan; and a compile for a TPU
topology (libtpu, no chip) of the layer's gradient runs both kernels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_tpu_kernels import abstract, close, tpu_kernels

from qwenvl_jax.layers.deltanet import GatedDeltaNet, chunk_gated_delta_rule
from qwenvl_jax.sharding import state_shardings

jax.config.update("jax_default_matmul_precision", "highest")


def kernels(fn, *args) -> list[str]:
    """The Pallas kernels in fn's program."""
    return re.findall(r"name=(gated_delta_rule_\w+)", str(jax.make_jaxpr(fn)(*args)))


T = 150  # three chunks of 64, the last one partly padding


SEGMENTS = np.ones((2, T), np.int32)
SEGMENTS[0, 40:100], SEGMENTS[0, 100:] = 2, 3  # packed: samples start mid-chunk
SEGMENTS[1, :75], SEGMENTS[1, 120:] = 0, 0  # left-padded past a chunk, and bucket-padded
SEGMENTS[1, 100:120] = 2


CASES = [  # (key heads, value heads, initial state)
    (1, 2, True),  # two value heads read each key head
    (2, 2, False),
]


def inputs(rng, hk, h, d, *, initial):
    """q, k, v, g, beta and the initial state as the layer passes them (g <= 0, beta in (0, 1))."""

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    args = [
        normal(2, T, hk, d),
        normal(2, T, hk, d),
        normal(2, T, h, d),
        -jnp.asarray(rng.uniform(0.005, 0.5, (2, T, h)), jnp.float32),
        jax.nn.sigmoid(normal(2, T, h)),
    ]
    return args + [normal(2, h, d, d, scale=0.3)] if initial else args


@pytest.mark.parametrize("hk,h,initial", CASES)
def test_kernel_equals_the_scan(hk, h, initial):
    """Packed samples (the state restarts mid-chunk), left and right padding (no decay, no
    write), three chunks of which the last is partly past T."""
    rng = np.random.default_rng(hk + h)
    d = 128
    seg = jnp.asarray(SEGMENTS)
    args = inputs(rng, hk, h, d, initial=initial)
    cot = (
        jnp.asarray(rng.standard_normal((2, T, h, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, h, d, d)), jnp.float32),
    )

    def rule(interpret):
        def f(q, k, v, g, beta, state=None):
            return chunk_gated_delta_rule(q, k, v, g, beta, seg, state, interpret=interpret)

        return f

    assert kernels(rule(True), *args) == ["gated_delta_rule_fwd"]
    assert kernels(lambda *a: jax.vjp(rule(True), *a)[1](cot), *args) == [
        "gated_delta_rule_fwd",
        "gated_delta_rule_bwd",
    ]

    def run(f):
        out, vjp = jax.vjp(jax.jit(f), *args)
        return *out, *vjp(cot)

    got, want = run(rule(True)), run(rule(False))
    for a, b in zip(got, want, strict=True):
        close(a, b)
    # without a gradient the forward kernel keeps no starting states: the same results
    for a, b in zip(jax.jit(rule(True))(*args), want[:2], strict=True):
        close(a, b)
    o = np.asarray(want[0])
    live = SEGMENTS != 0
    assert not o[~live].any() and np.abs(o[live]).max(axis=-1).all()
    if initial:  # the first segment of each row reads the initial state
        assert np.abs(np.asarray(got[-1])).max(axis=(2, 3)).all()


def test_sizes_the_kernel_cannot_tile_take_the_scan():
    """Head dims that are no multiple of 128 lanes, or a chunk of no whole 8-row tiles, use the
    JAX scan."""
    rng = np.random.default_rng(0)
    seg = jnp.asarray(SEGMENTS)
    for d, chunk, kernel in ((128, 64, True), (16, 64, False), (128, 60, False)):
        args = inputs(rng, 1, 2, d, initial=True)

        def f(*a, chunk=chunk):
            return chunk_gated_delta_rule(*a[:5], seg, a[5], chunk, interpret=True)

        assert bool(kernels(f, *args)) == kernel, (d, chunk)


def test_a_tpu_compile_takes_the_kernels(v5p_mesh):
    """A training step's Gated DeltaNet layer (Qwen3.5's head dims, 128), rows split over
    data x fsdp and heads over tensor: each chip runs the forward kernel (keeping the chunks'
    starting states) and the backward kernel on its rows and heads."""
    layer = GatedDeltaNet(
        256,
        num_key_heads=2,
        num_value_heads=4,
        key_head_dim=128,
        value_head_dim=128,
        dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0),
    )
    graph, params = nnx.split(layer)
    shardings = state_shardings(params, v5p_mesh)
    spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings
    )
    x = abstract((8, 128, 256), jnp.bfloat16, v5p_mesh, ("batch", None, None))
    seg = abstract((8, 128), jnp.int32, v5p_mesh, ("batch", None))

    def loss(params, x, seg):
        out, state = nnx.merge(graph, params)(x, seg)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(state.recurrent)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(spec, x, seg).compile()
    names = tpu_kernels(compiled)
    assert len(names) == 2, names
    assert any(n.startswith("gated_delta_rule_fwd") for n in names), names
    assert any(n.startswith("gated_delta_rule_bwd") for n in names), names
