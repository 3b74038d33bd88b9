"""Rematerialisation policies: which intermediate values of a transformer block the backward pass
keeps ("dots": matmul outputs) and which it recomputes ("full": everything but the block input).

Models hold the chosen policy name as a plain attribute (`remat`, set by `train.blocks.configure`)
and run each block, or the body of a scan over stacked blocks, through `checkpointed`. The scans
over stacked layers take their unroll factor from `layer_scan_unroll` (1; `qwenvl-jax plan` compiles
a second time with 2 to time the loop bodies).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_UNROLL = contextvars.ContextVar("layer_scan_unroll", default=1)


def layer_scan_unroll() -> int:
    """The unroll factor of the scans over stacked layers traced now."""
    return _UNROLL.get()


@contextlib.contextmanager
def unrolled_layer_scans(n: int) -> Iterator[None]:
    """Trace the scans over stacked layers with `n` layers (or patterns) per loop iteration.
    jit caches traces: clear them (jax.clear_caches) to retrace a function already traced."""
    token = _UNROLL.set(n)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def check_policy(policy: str) -> str:
    if policy != "none" and policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r} (use one of {sorted(POLICIES)})")
    return policy


def checkpointed(
    fn: Callable, policy: str, *, prevent_cse: bool = True, in_order: bool = False
) -> Callable:
    """`fn` (a pure function of arrays) under `jax.checkpoint` with `policy` ("none": `fn`).

    in_order: the backward pass recomputes `fn`'s forward only once the cotangent of its output
    exists. For the layers of a pattern in one scan body: their recomputations depend on nothing
    but the saved inputs, so the compiler is free to run them all before the first layer's
    backward and hold every layer's activations at once."""
    if check_policy(policy) == "none":
        return fn
    remat = jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=prevent_cse)
    if not in_order:
        return remat

    @jax.custom_vjp
    def ordered(*args):
        return fn(*args)

    def forward(*args):
        return jax.vjp(remat, *args)  # the pullback (a pytree of the saved values) is the residual

    def backward(pullback, cotangent):
        pullback, cotangent = jax.lax.optimization_barrier((pullback, cotangent))
        return pullback(cotangent)

    ordered.defvjp(forward, backward)
    return ordered


def after(state: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    """(state, x) behind one optimization barrier: the later layers of a scanned pattern pass
    their weights through it with their input, so that the compiler gathers (FSDP) each layer's
    weights when that layer runs, not all of the pattern's at the start of the body."""
    return jax.lax.optimization_barrier((state, x))


def call_block(block: nnx.Module, policy: str, *args: jax.Array) -> jax.Array:
    """`block(*args)` (array arguments only) under the remat `policy`."""
    if check_policy(policy) == "none":
        return block(*args)
    # split/merge around a pure function: the block's parameters may be tracers of an enclosing
    # jax transform (the train step's grad), which nnx.remat would refuse to carry across
    graphdef, state = nnx.split(block)

    def run(state, *a):
        return nnx.merge(graphdef, state)(*a)

    return checkpointed(run, policy)(state, *args)
