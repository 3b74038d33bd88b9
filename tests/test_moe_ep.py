"""Expert parallelism: under a mesh with an `expert` axis each device computes only its own experts
(`experts_parallel`), with the result and gradients of one device (float32, 1e-5 relative), and
no device ever all-gathers every expert's weights (checked in the compiled HLO, for 8 simulated
CPU devices and, with libtpu, for a v5p slice). Also: every backend treats expert id E as a copy
routed to no expert here (zero output, zero gradient)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_tpu_kernels import close

from qwenvl_jax.layers.moe import SparseMoE, experts_gmm, experts_ragged, experts_tiled

jax.config.update("jax_default_matmul_precision", "highest")


BACKENDS = {
    "tiled": experts_tiled,
    "ragged": experts_ragged,
    "gmm": lambda *a, act: experts_gmm(*a, act=act, interpret=True),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_id_e_is_routed_to_no_expert(backend):
    """Copies of id E (another device's experts) give zero output and no gradient; the other
    copies are computed as when every id is in range."""
    E, D, I, n, k = 4, 32, 24, 30, 2  # noqa: E741
    rng = np.random.default_rng(3)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(n)])
    elsewhere = rng.random((n, k)) < 0.4
    elsewhere[:, :] &= ids != 1  # expert 1 keeps all of its copies; others lose some
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    w_gu = jnp.asarray(rng.standard_normal((E, D, 2 * I)) * 0.1, jnp.float32)
    w_d = jnp.asarray(rng.standard_normal((E, I, D)) * 0.1, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((n, k, D)), jnp.float32)
    mask = jnp.asarray(elsewhere)[..., None]

    def run(f, experts, masked):
        def fn(x, a, b):
            y = f(x, jnp.asarray(experts, jnp.int32), a, b, act="silu")
            return jnp.where(mask, 0.0, y) if masked else y

        y, vjp = jax.vjp(jax.jit(fn), x, w_gu, w_d)
        return y, *vjp(cot)

    got = run(BACKENDS[backend], np.where(elsewhere, E, ids), masked=False)
    want = run(experts_ragged, ids, masked=True)
    assert not np.asarray(got[0])[elsewhere].any()
    for a, b in zip(got, want, strict=True):
        close(a, b)


SCRIPT = r"""
import re
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from qwenvl_jax.layers.moe import (
    SparseMoE, experts_parallel, experts_ragged, grouped_gmm, grouped_ragged, round_rows,
)
from qwenvl_jax.sharding import make_mesh, named_sharding, state_shardings, use_mesh

D, I, E, K = 64, 40, 8, 2  # feature sizes apart from the token counts
EMPTY = (5, 6)  # experts that get no token


def check(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def all_gathers(text):
    # the array shapes of each all-gather's result
    found = re.findall(r"= ([^=]*?) all-gather(?:-start)?\(", text)
    return [tuple(int(d) for d in s.split(",") if d) for r in found
            for s in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", r)]


def moe_and_inputs(B, T, seed):
    # uneven routing: along direction u expert 0 scores high, experts 5 and 6 far below the rest
    moe = SparseMoE(D, I, E, K, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    u = np.zeros(D, np.float32); u[0] = 1.0
    kernel = np.array(moe.gate.kernel[...])
    kernel[0] = 0.0
    kernel[0, 0], kernel[0, list(EMPTY)] = 0.5, -10.0
    moe.gate.kernel[...] = jnp.asarray(kernel)
    x = rng.standard_normal((B, T, D)).astype(np.float32) + 3.0 * u
    return moe, jnp.asarray(x)


def loss(params, x, graph):
    out, logits = nnx.merge(graph, params)(x)
    c = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(jnp.sin(out) * c) + 0.1 * jnp.sum(logits ** 2)


grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)

for mesh_axes, (B, T) in (
    (dict(fsdp=2, expert=4), (2, 12)),
    (dict(expert=8), (2, 12)),
    (dict(expert=8), (1, 5)),  # 5 tokens: padded to the 8 devices with rows of no expert
    (dict(tensor=2, expert=4), (4, 6)),
    (dict(data=2, expert=4), (2, 12)),
):
    moe, x = moe_and_inputs(B, T, seed=B * T)
    graph, params = nnx.split(moe)
    _, logits = moe(x)
    chosen = np.asarray(jax.lax.top_k(logits, K)[1]).ravel()
    counts = np.bincount(chosen, minlength=E)
    assert (counts[list(EMPTY)] == 0).all() and len(set(counts[counts > 0])) > 1, counts
    if mesh_axes == dict(expert=8) and B * T == 24:  # one expert a device, 3 tokens each
        # expert 0's device receives more copies than a round holds: it takes several rounds
        assert counts[0] > round_rows(3, K, 8 * 3), (counts, round_rows(3, K, 8 * 3))
    want = grad(params, x, graph)

    mesh = make_mesh(**mesh_axes)
    with use_mesh(mesh):
        sharded = jax.device_put(params, state_shardings(params, mesh))
        xs = jax.device_put(x, named_sharding(("batch", None, None), x.shape, mesh))
        got = grad(sharded, xs, graph)
        text = grad.lower(sharded, xs, graph).compile().as_text()
    check(got, want)
    ep = mesh.shape["expert"]
    # the all-gathers of expert weights (by their feature dimensions)
    gathered = {g for g in all_gathers(text) if len(g) == 3 and g[1:] in {(D, 2 * I), (I, D)}}
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:  # local experts whole: E/ep of them
        assert gathered == {(E // ep, D, 2 * I), (E // ep, I, D)}, gathered
    else:  # split on experts alone: no weight is gathered at all
        assert not gathered, gathered
    # the copies go to their experts' devices and back by all-to-all: no flat token array [N, D]
    # nor their ids [N, k] is all-gathered (the layer's input [B, T, D] and the router's [., E]
    # may be, as any layer's)
    assert "all-to-all" in text
    others = [g for g in all_gathers(text) if g not in gathered and len(g) < 3 and g[-1] != E]
    assert not [g for g in others if g[0] >= B * T], others
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:  # the weights' gradients
        assert "reduce-scatter" in text
    print("module ok", mesh_axes, B * T, sorted(gathered), others)

# the megablox kernels (interpret mode) and ragged_dot as the per-device backend
rng = np.random.default_rng(0)
n = 40
ids = np.stack([rng.choice([0, 1, 2, 3, 7], K, replace=False, p=[.6, .1, .1, .1, .1])
                for _ in range(n)])
experts = jnp.asarray(ids, jnp.int32)
weights = jnp.asarray(rng.random((n, K)), jnp.float32)
x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
w_gu = jnp.asarray(rng.standard_normal((E, D, 2 * I)) * 0.1, jnp.float32)
w_d = jnp.asarray(rng.standard_normal((E, I, D)) * 0.1, jnp.float32)
cot = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)


def vjp(f, *args):
    out, back = jax.vjp(jax.jit(f), *args)
    return out, *back(cot)


def single(x, w, a, b):
    return jnp.sum(experts_ragged(x, experts, a, b, act="silu") * w[..., None], axis=1)


want = vjp(single, x, weights, w_gu, w_d)
mesh = make_mesh(fsdp=2, expert=4)
for name, fn in (("ragged", grouped_ragged),
                 ("gmm", lambda *a, act: grouped_gmm(*a, act=act, interpret=True))):
    def parallel(x, w, a, b):
        return experts_parallel(x, experts, w, a, b, act="silu", experts_fn=fn)

    with use_mesh(mesh):
        check(vjp(parallel, x, weights, w_gu, w_d), want)
    print("backend ok", name)
"""


def test_expert_parallel_equals_one_device():
    """8 simulated CPU devices, meshes (fsdp 2, expert 4), (expert 8), (tensor 2, expert 4) and
    (data 2, expert 4): the MoE layer's output, router logits and gradients (input, router, every
    expert weight) equal one device's, with uneven routing and experts that get no token; the
    compiled step all-gathers E/ep experts' weights at most. Also the ragged_dot and megablox
    (interpret mode) grouped backends as the per-device computation."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("module ok") == 5 and r.stdout.count("backend ok") == 2, r.stdout


def test_a_tpu_compile_gathers_no_full_expert_weights():
    """A v5p:2x2x2 slice as the mesh (expert 8): the training step's MoE layer compiles with the
    gmm kernels on each chip's one expert, ragged all-to-alls of the token copies and no
    all-gather of expert weights or tokens. (The TPU compiler
    may lower the small reduce-scatter as an all-reduce, so that is not asserted.)"""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "qwenvl_jax[tpu]"): no TPU compiler')
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    from qwenvl_jax.sharding import make_mesh, named_sharding, state_shardings, use_mesh

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = make_mesh(expert=8, devices=devices)
    D, I, E = 384, 128, 8  # noqa: E741  (weights [E, 384, 256], [E, 128, 384]: no token shape)
    moe = SparseMoE(D, I, E, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, params = nnx.split(moe)
    spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        params,
        state_shardings(params, mesh),
    )
    shape = (8, 24, D)
    x = jax.ShapeDtypeStruct(
        shape, jnp.bfloat16, sharding=named_sharding(("batch", None, None), shape, mesh)
    )

    def loss(params, x):
        out, logits = nnx.merge(graph, params)(x)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(logits.astype(jnp.float32))

    with jax.default_matmul_precision("default"), use_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(spec, x).compile().as_text()
    kernels = re.findall(
        r"%(\S+) = [^\n]*custom-call\([^\n]*custom_call_target=\"tpu_custom_call\"", text
    )
    # the forward's two; the gradient recomputes both (the routing weights' gradient reads the
    # experts' outputs) and runs two for the inputs' gradients
    assert sum(n.startswith("gmm") for n in kernels) == 6, kernels
    assert sum(n.startswith("tgmm") for n in kernels) == 2, kernels
    results = re.findall(r"= ([^=]*?) all-gather(?:-start)?\(", text)
    shapes = [s for r in results for s in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", r)]
    # the copies go to the chips of their experts and back by ragged all-to-all (forward: the
    # copies and their routing weights there, the weighted outputs back; gradient: the copies,
    # their weights and their cotangents there, the gradients of both back), and no token row is
    # all-gathered
    assert len(re.findall(r" ragged-all-to-all(?:-start)?\(", text)) == 8, "ragged-all-to-all"
    assert not [s for s in shapes if s.endswith(f",{D}")], shapes
    # one expert a chip, split on experts alone: no expert weight is gathered at all
    assert not [s for s in shapes if s.endswith((f",{D},{2 * I}", f",{I},{D}"))], shapes
    # the weights' gradients (tgmm) are of the chip's one expert
    grads = re.findall(r"%tgmm\S* = [a-z0-9]+\[([0-9,]*)\]", text)
    assert sorted(grads) == sorted([f"1,{D},{2 * I}", f"1,{I},{D}"]), grads
