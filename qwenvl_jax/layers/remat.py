"""Rematerialisation policies: which intermediate values of a transformer block the backward pass
keeps ("dots": matmul outputs) and which it recomputes ("full": everything but the block input).

Models hold the chosen policy name as a plain attribute (`remat`, set by `train.blocks.configure`)
and run each block, or the body of a scan over stacked blocks, through `checkpointed`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: str) -> str:
    if policy != "none" and policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r} (use one of {sorted(POLICIES)})")
    return policy


def checkpointed(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` (a pure function of arrays) under `jax.checkpoint` with `policy` ("none": `fn`)."""
    if check_policy(policy) == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=prevent_cse)


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
