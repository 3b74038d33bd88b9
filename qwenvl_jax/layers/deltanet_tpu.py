"""The chunked gated delta rule's state recurrence as Pallas TPU kernels, forward and backward.

`chunk_gated_delta_rule` (deltanet.py) prepares each chunk in JAX: the WY terms u, w (the values
a chunk writes are u - w S, S the state it starts from), the decayed within-chunk attention, q and
k decayed to and from the chunk's ends, and the decay of the whole chunk. What is left is
sequential across chunks; per (row, value head), for chunks n = 0, 1, ...

    v_new = u_n - w_n S;   o_n = q_n S + attn_n v_new;   S <- d_n S + k_n^T v_new

`chunk_scan` runs it as one kernel over the grid (rows x heads, chunks), the chunk axis in order
with the float32 state [d_k, d_v] in VMEM; it also keeps the state each chunk starts from, which
the backward kernel reads while it runs the chunks in reverse with the state's cotangent in VMEM.
A `jax.custom_vjp` ties the two, so the gradient is the kernels' and equals autodiff of the scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwenvl_jax.sharding import map_shards

LANES = 128
SUBLANES = 8
TRANS_B = (((1,), (1,)), ((), ()))  # x @ y^T


def fits(d_k: int, d_v: int, chunk: int) -> bool:
    """Whether the kernels tile these sizes: the state's dimensions whole 128-lane multiples and
    the chunk whole 8-row sublane tiles (Qwen3.5: 128, 128, 64). Others take the JAX scan."""
    return d_k % LANES == 0 and d_v % LANES == 0 and chunk % SUBLANES == 0


def chunk_scan(state, u, w, attn, q_state, k_end, chunk_decay, *, interpret: bool = False):
    """The cross-chunk recurrence of `chunk_gated_delta_rule` by the Pallas kernels: state
    float32[B, H, d_k, d_v]; u float32[B, H, N, C, d_v]; w, q_state, k_end float32[B, H, N, C, d_k];
    attn float32[B, H, N, C, C]; chunk_decay float32[B, H, N]. Returns o float32[B, H, N, C, d_v]
    and the final state. `interpret` runs the kernels in Pallas interpret mode (any backend).

    Under a mesh each device runs the kernels on its rows (split as the batch) and heads."""
    chunked = ("batch", "act_heads", None, None, None)
    run = map_shards(
        functools.partial(_chunk_scan, interpret=interpret),
        in_axes=(("batch", "act_heads", None, None), *[chunked] * 5, ("batch", "act_heads", None)),
        out_axes=("batch", "act_heads"),  # a prefix of both results' axes
    )
    return run(state, u, w, attn, q_state, k_end, chunk_decay)


def _chunk_scan(state, u, w, attn, q_state, k_end, chunk_decay, *, interpret):
    """`chunk_scan` on one device: rows and heads flattened into the kernels' first grid axis."""
    B, H, N, C, dv = u.shape
    dk = w.shape[-1]

    def flat(x):
        return x.reshape(B * H, *x.shape[2:])

    # the decay multiplies the state's columns: one lane-dense row per chunk
    decay = jnp.broadcast_to(chunk_decay.reshape(B * H, N, 1, 1), (B * H, N, 1, dv))
    o, final = _recurrence(
        flat(state), flat(u), flat(w), flat(attn), flat(q_state), flat(k_end), decay, interpret
    )
    return o.reshape(B, H, N, C, dv), final.reshape(B, H, dk, dv)


# ----------------------------------------------------------------------------- kernels


def _dot(x, y):
    return jax.lax.dot(x, y, preferred_element_type=jnp.float32)


def _forward_kernel(
    s0_ref, u_ref, w_ref, attn_ref, qs_ref, ke_ref, decay_ref, o_ref, final_ref, *rest
):
    """One chunk of one (row, head); `rest` is the starting states' output (when the backward
    needs them) and the state scratch."""
    *starts_ref, s_ref = rest
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        s_ref[...] = s0_ref[0]

    s = s_ref[...]
    if starts_ref:
        starts_ref[0][0, 0] = s
    v_new = u_ref[0, 0] - _dot(w_ref[0, 0], s)
    o_ref[0, 0] = _dot(qs_ref[0, 0], s) + _dot(attn_ref[0, 0], v_new)
    s = s * decay_ref[0, 0] + _dot(ke_ref[0, 0].T, v_new)
    s_ref[...] = s

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[0] = s


def _backward_kernel(
    starts_ref,
    u_ref,
    w_ref,
    attn_ref,
    qs_ref,
    ke_ref,
    decay_ref,
    do_ref,
    dfinal_ref,
    du_ref,
    dw_ref,
    dattn_ref,
    dqs_ref,
    dke_ref,
    ddecay_ref,
    ds0_ref,
    ds_ref,
):
    """One chunk of one (row, head), chunks in reverse: ds_ref holds the cotangent of the state
    the chunk ends with, and leaves that of the state it starts from."""
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        ds_ref[...] = dfinal_ref[0]

    s, ds = starts_ref[0, 0], ds_ref[...]
    w, ke, qs, do, attn = w_ref[0, 0], ke_ref[0, 0], qs_ref[0, 0], do_ref[0, 0], attn_ref[0, 0]
    v_new = u_ref[0, 0] - _dot(w, s)
    dv_new = _dot(attn.T, do) + _dot(ke, ds)
    du_ref[0, 0] = dv_new
    dw_ref[0, 0] = -jax.lax.dot_general(dv_new, s, TRANS_B, preferred_element_type=jnp.float32)
    dattn_ref[0, 0] = jax.lax.dot_general(do, v_new, TRANS_B, preferred_element_type=jnp.float32)
    dqs_ref[0, 0] = jax.lax.dot_general(do, s, TRANS_B, preferred_element_type=jnp.float32)
    dke_ref[0, 0] = jax.lax.dot_general(v_new, ds, TRANS_B, preferred_element_type=jnp.float32)
    ddecay_ref[0, 0] = jnp.sum(s * ds, axis=0, keepdims=True)
    ds = ds * decay_ref[0, 0] + _dot(qs.T, do) - _dot(w.T, dv_new)
    ds_ref[...] = ds

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        ds0_ref[0] = ds


def _specs(N, C, dk, dv, reverse):
    """Block specs of the per-chunk arrays, visiting chunk n (or N-1-n)."""

    def chunk(i, n):
        return (i, N - 1 - n if reverse else n, 0, 0)

    def per_chunk(*block):
        return pl.BlockSpec((1, 1, *block), chunk)

    state = pl.BlockSpec((1, dk, dv), lambda i, n: (i, 0, 0))
    return dict(
        state=state,
        starts=per_chunk(dk, dv),
        u=per_chunk(C, dv),
        w=per_chunk(C, dk),
        attn=per_chunk(C, C),
        decay=per_chunk(1, dv),
    )


_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward(s0, u, w, attn, qs, ke, decay, interpret, keep_starts):
    BH, N, C, dv = u.shape
    dk = w.shape[-1]
    sp = _specs(N, C, dk, dv, reverse=False)
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((BH, N, C, dv), f32),
        jax.ShapeDtypeStruct((BH, dk, dv), f32),
    ]
    out_specs = [sp["u"], sp["state"]]
    if keep_starts:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, dk, dv), f32))
        out_specs.append(sp["starts"])
    return pl.pallas_call(
        _forward_kernel,
        out_shape=out_shape,
        grid=(BH, N),
        in_specs=[sp["state"], sp["u"], sp["w"], sp["attn"], sp["w"], sp["w"], sp["decay"]],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
        compiler_params=_PARAMS,
        interpret=interpret,
        name="gated_delta_rule_fwd",
    )(s0, u, w, attn, qs, ke, decay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _recurrence(s0, u, w, attn, qs, ke, decay, interpret):
    """float32 [BH, ...] operands -> o float32[BH, N, C, d_v], final state float32[BH, d_k, d_v]."""
    o, final = _forward(s0, u, w, attn, qs, ke, decay, interpret, keep_starts=False)
    return o, final


def _recurrence_fwd(s0, u, w, attn, qs, ke, decay, interpret):
    o, final, starts = _forward(s0, u, w, attn, qs, ke, decay, interpret, keep_starts=True)
    return (o, final), (starts, u, w, attn, qs, ke, decay)


def _recurrence_bwd(interpret, residuals, cotangents):
    starts, u, w, attn, qs, ke, decay = residuals
    do, dfinal = cotangents
    BH, N, C, dv = u.shape
    dk = w.shape[-1]
    sp = _specs(N, C, dk, dv, reverse=True)
    f32 = jnp.float32
    du, dw, dattn, dqs, dke, ddecay, ds0 = pl.pallas_call(
        _backward_kernel,
        out_shape=[jax.ShapeDtypeStruct(x.shape, f32) for x in (u, w, attn, qs, ke, decay, dfinal)],
        grid=(BH, N),
        in_specs=[
            sp["starts"],
            sp["u"],
            sp["w"],
            sp["attn"],
            sp["w"],
            sp["w"],
            sp["decay"],
            sp["u"],
            sp["state"],
        ],
        out_specs=[sp["u"], sp["w"], sp["attn"], sp["w"], sp["w"], sp["decay"], sp["state"]],
        scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
        compiler_params=_PARAMS,
        interpret=interpret,
        name="gated_delta_rule_bwd",
    )(starts, u, w, attn, qs, ke, decay, do.astype(f32), dfinal.astype(f32))
    return ds0, du, dw, dattn, dqs, dke, ddecay


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
