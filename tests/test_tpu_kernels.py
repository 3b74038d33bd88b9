"""The TPU kernels (JAX's Pallas megablox grouped matmul for the MoE experts, splash attention)
equal the XLA paths in float32 (1e-5 relative), forward and gradients, run here in Pallas
interpret mode; and a compile for a TPU topology (libtpu, no chip) picks them by platform."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.layers.attention import dot_product_attention, splash_attention
from qwenvl_jax.layers.moe import SparseMoE, experts_gmm, experts_ragged
from qwenvl_jax.sharding import named_sharding, state_shardings
from qwenvl_jax.train.plan import hlo_matmul_flops

jax.config.update("jax_default_matmul_precision", "highest")


def close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------- MoE experts: megablox gmm

E = 8


def skewed_routing(n: int, k: int, rng, empty: tuple[int, ...]) -> np.ndarray:
    """int[n, k] distinct experts per token, uneven: expert 0 is picked far more often than the
    rest, the experts in `empty` never."""
    pool = np.array([e for e in range(E) if e not in empty])
    p = np.where(pool == 0, 8.0, 1.0)
    return np.stack([rng.choice(pool, k, replace=False, p=p / p.sum()) for _ in range(n)])


GMM_CASES = [  # (tokens, top-k, D, I, experts never routed to)
    (1, 2, 48, 40, (1, 4, 5, 6, 7)),  # a decoding step: one row tile of 16, mostly padding
    (37, 2, 48, 40, (1, 4, 7)),  # padding rows join the (empty) last expert's group
    (300, 2, 48, 40, (3,)),  # 600 copies: groups start and end inside the 2 row tiles of 512
    (64, 3, 384, 64, (2, 5)),  # D = 3 blocks of 128 (the backward swaps the blocked sides)
]


@pytest.mark.parametrize("n,k,d,i,empty", GMM_CASES)
def test_gmm_equals_ragged(n, k, d, i, empty):
    rng = np.random.default_rng(n + d)
    experts = jnp.asarray(skewed_routing(n, k, rng, empty), jnp.int32)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w_gu = jnp.asarray(rng.standard_normal((E, d, 2 * i)) * 0.1, jnp.float32)
    w_d = jnp.asarray(rng.standard_normal((E, i, d)) * 0.1, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((n, k, d)), jnp.float32)

    def run(f):
        fn = jax.jit(lambda x, a, b: f(x, experts, a, b))
        y, vjp = jax.vjp(fn, x, w_gu, w_d)
        return y, *vjp(cot)

    got = run(lambda *a: experts_gmm(*a, act="silu", interpret=True))
    want = run(lambda *a: experts_ragged(*a, act="silu"))
    for a, b in zip(got, want, strict=True):
        close(a, b)
    _, _, dw_gu, dw_d = got
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    assert (counts[list(empty)] == 0).all()
    assert n == 1 or len(set(counts[counts > 0])) > 1  # uneven groups
    assert not np.asarray(dw_gu)[list(empty)].any() and not np.asarray(dw_d)[list(empty)].any()
    assert np.asarray(dw_d)[counts > 0].any(axis=(1, 2)).all()


def kernels_in(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_gmm_takes_the_kernel_only_for_dimensions_it_can_tile():
    """A feature size that is neither a multiple of 128 nor small enough to be one block
    (520 here) uses ragged_dot, with the same result."""
    rng = np.random.default_rng(0)
    experts = jnp.asarray(skewed_routing(4, 2, rng, ()), jnp.int32)
    for d, kernel in ((48, True), (520, False)):
        x = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)
        w_gu = jnp.asarray(rng.standard_normal((E, d, 16)) * 0.1, jnp.float32)
        w_d = jnp.asarray(rng.standard_normal((E, 8, d)) * 0.1, jnp.float32)

        def gmm(x, a, b):
            return experts_gmm(x, experts, a, b, act="silu", interpret=True)

        assert kernels_in(gmm, x, w_gu, w_d) == kernel
        close(gmm(x, w_gu, w_d), experts_ragged(x, experts, w_gu, w_d, act="silu"))


# ---------------------------------------------------------------- attention: splash

T = 256


def segments(layout: str) -> np.ndarray:
    """int[2, T] segment ids of two rows."""
    seg = np.zeros((2, T), np.int32)
    if layout == "packed":  # causal training rows: several samples, the second row bucket-padded
        seg[0, :90], seg[0, 90:200], seg[0, 200:] = 1, 2, 3
        seg[1, :60], seg[1, 60:170] = 1, 2
    elif layout == "left_padded":  # a prefill batch padded on the left
        seg[0, 37:] = 1
        seg[1, :] = 1
    elif layout.startswith("windows"):  # a ViT: images and windows of uneven lengths, padding
        rows = ([0, 64, 128, 144, 208, 256], [0, 100, 164, 220])
        if layout == "windows64":  # windows of at most 64 patches (Qwen2.5-VL's)
            rows = (rows[0], [0, 30, 94, 150, 200])
        for row, bounds in enumerate(rows):
            for s, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
                seg[row, lo:hi] = s + 1
    return seg


SPLASH_CASES = [  # (layout, causal, query heads, key/value heads, scale, block, max_segment)
    ("packed", True, 4, 2, None, 128, None),  # GQA, two blocks a side (one skipped as future)
    ("packed", True, 4, 1, None, None, None),  # MQA, one 256 block
    ("left_padded", True, 2, 2, None, 128, None),
    ("windows", False, 2, 2, None, 128, None),
    ("windows", False, 4, 2, 0.3, 128, None),  # an explicit scale
    # a local mask of the blocks within max_segment of the diagonal (the ViT's windows)
    ("windows64", False, 2, 2, None, 128, 64),
    ("packed", True, 4, 2, None, 128, 110),
]


@pytest.mark.parametrize("layout,causal,h,kh,scale,block,max_segment", SPLASH_CASES)
def test_splash_equals_xla(layout, causal, h, kh, scale, block, max_segment):
    rng = np.random.default_rng(len(layout) + h + kh)
    D = 16
    seg = jnp.asarray(segments(layout))
    live = (seg != 0)[..., None, None]
    q = jnp.asarray(rng.standard_normal((2, T, h, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, T, kh, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, T, kh, D)), jnp.float32)
    # padding's outputs get no gradient (the loss ignores them), as in training
    cot = jnp.asarray(rng.standard_normal((2, T, h, D)), jnp.float32) * live

    def run(f):
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out * live, *vjp(cot)

    got = run(
        lambda q, k, v: splash_attention(
            q,
            k,
            v,
            seg,
            seg,
            causal=causal,
            scale=D**-0.5 if scale is None else scale,
            block=block,
            interpret=True,
            max_segment=max_segment,
        )
    )
    want = run(
        lambda q, k, v: dot_product_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, scale=scale
        )
    )
    for a, b in zip(got, want, strict=True):
        close(a, b)
    assert np.asarray(got[0][0, 200:]).any()  # the last segment / window is computed


# ---------------------------------------------------------------- under a mesh

MESH_SCRIPT = r"""
import re
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 4, jax.devices()
from jax.sharding import NamedSharding, PartitionSpec as P
from qwenvl_jax.layers.attention import dot_product_attention, splash_attention
from qwenvl_jax.layers.moe import experts_gmm, experts_ragged
from qwenvl_jax.sharding import make_mesh, use_mesh

mesh = make_mesh(data=2, tensor=2)
rng = np.random.default_rng(0)
def arr(shape, spec, scale=1.0):
    a = jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
    return jax.device_put(a, NamedSharding(mesh, spec))

def check(got, want):
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

def vjp(f, cot, *args):
    with use_mesh(mesh):
        out, back = jax.vjp(jax.jit(f), *args)
        return out, *back(cot)

def split(f, *args):  # the shard_map in_specs of f's program
    with use_mesh(mesh):
        text = str(jax.make_jaxpr(f)(*args))
    return re.findall(r"in_specs=\(([^\n]*)\)", text)

# the experts: tokens split over data, computed twice over tensor (the weights' gradient is
# summed once, not once per copy)
n, k, E, D, I = 40, 2, 8, 48, 40
routing = np.stack([rng.choice(E - 2, k, replace=False) for _ in range(n)])
experts = jax.device_put(jnp.asarray(routing, jnp.int32), NamedSharding(mesh, P("data")))
x, w_gu, w_d = arr((n, D), P("data")), arr((E, D, 2 * I), P(), 0.1), arr((E, I, D), P(), 0.1)
cot = arr((n, k, D), P("data"))
gmm = lambda *a: experts_gmm(a[0], experts, *a[1:], act="silu", interpret=True)
assert "P('data', None), P('data', None), P(None, None, None)," in split(gmm, x, w_gu, w_d)[0]
want = vjp(lambda *a: experts_ragged(a[0], experts, *a[1:], act="silu"), cot, x, w_gu, w_d)
check(vjp(gmm, cot, x, w_gu, w_d), want)
print("experts ok")

# attention: rows over data, heads over tensor (kv heads with them); one kv head: heads whole
T = 128
seg = np.ones((4, T), np.int32)
seg[0, 50:], seg[1, :20], seg[2, 70:] = 2, 0, 0
seg = jax.device_put(jnp.asarray(seg), NamedSharding(mesh, P("data")))
live = (seg != 0)[..., None, None]
def splash(q, k, v):
    return splash_attention(q, k, v, seg, seg, causal=True, scale=0.25, interpret=True)
def xla(q, k, v):
    return dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
for kh, heads in ((2, "tensor"), (1, None)):
    q, kk, v = (arr((4, T, h, 16), P("data")) for h in (4, kh, kh))
    assert f"P('data', None, {heads!r}, None)" in split(splash, q, kk, v)[0]
    cot = arr((4, T, 4, 16), P("data")) * live
    got, want = vjp(splash, cot, q, kk, v), vjp(xla, cot, q, kk, v)
    check((got[0] * live, *got[1:]), (want[0] * live, *want[1:]))
print("attention ok")
"""


def test_kernels_under_a_mesh_equal_xla():
    """On 4 simulated CPU devices, mesh (data=2, tensor=2): each device runs the kernels on its
    shard (shard_map) and the results and gradients equal the XLA paths'."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
    )
    r = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "experts ok" in r.stdout and "attention ok" in r.stdout


# ---------------------------------------------------------------- compiled for a TPU topology


def tpu_kernels(compiled) -> list[str]:
    """The names of the Pallas TPU kernels (Mosaic custom calls) of a compiled program."""
    text = compiled.as_text()
    pattern = r"%(\S+) = [^\n]*custom-call\([^\n]*custom_call_target=\"tpu_custom_call\""
    return re.findall(pattern, text)


def abstract(shape, dtype, mesh, axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(axes, shape, mesh))


def test_a_tpu_compile_takes_the_gmm_kernels(v5p_mesh):
    """A training step's MoE layer, sharded over the slice: each chip runs the kernels on its
    tokens."""
    moe = SparseMoE(256, 128, E, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, params = nnx.split(moe)
    shardings = state_shardings(params, v5p_mesh)
    spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings
    )
    x = abstract((8, 32, 256), jnp.bfloat16, v5p_mesh, ("batch", None, None))

    def loss(params, x):
        out, logits = nnx.merge(graph, params)(x)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(logits.astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(spec, x).compile()
    names = tpu_kernels(compiled)
    # forward: two gmm; backward: per product a gmm (input) and a tgmm (weights)
    assert sum(n.startswith("gmm") for n in names) == 4, names
    assert sum(n.startswith("tgmm") for n in names) == 2, names


def test_a_tpu_compile_takes_splash_attention_where_it_fits(v5p_mesh):
    def compiled_kernels(t: int, flops: bool = False, **kw):
        def loss(q, k, v, seg):
            out = dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, **kw)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        heads = ("batch", None, "act_heads", None)
        qs = abstract((4, t, 4, 80), jnp.bfloat16, v5p_mesh, heads)
        kvs = abstract((4, t, 2, 80), jnp.bfloat16, v5p_mesh, heads)
        seg = abstract((4, t), jnp.int32, v5p_mesh, ("batch", None))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        compiled = grad.lower(qs, kvs, kvs, seg).compile()
        return tpu_kernels(compiled) if not flops else hlo_matmul_flops(compiled.as_text())

    for causal in (True, False):
        names = compiled_kernels(256, causal=causal)
        assert len(names) == 3 and all(n.startswith("splash_mha_") for n in names), names
        for phase in ("fwd", "dq", "dkv"):
            assert any(n.startswith(f"splash_mha_{phase}_segmented") for n in names), names
    # windows of at most 64 positions: a local mask in blocks of 128, the kernels visit 3 of 16
    # key blocks a row (the whole sequence: 4 of 4 blocks of 512)
    whole, local = (
        compiled_kernels(2048, True, causal=False, max_segment=m)["kernels"] for m in (None, 64)
    )
    assert local == whole * 3 / 16, (local, whole)
    assert compiled_kernels(200, causal=True) == []  # 200 is no whole number of blocks
    slots = jnp.broadcast_to(jnp.arange(256), (4, 256))  # positions given: the XLA path
    assert compiled_kernels(256, causal=True, q_positions=slots, kv_positions=slots) == []
