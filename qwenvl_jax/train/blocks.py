"""How the transformer blocks run under training: rematerialisation and scanned decoder layers.

Both are switched on per model instance without touching parameter paths (so freeze tables,
checkpoints and exports see the same tree): a block's class is swapped for a subclass whose
`__call__` wraps the original one.

- `apply_remat(model, policy)`: every decoder layer and ViT block (the items of a module list
  named `layers`, `blocks` or `resblocks`) runs under `jax.checkpoint` with the policy, so only
  the block inputs (and, for "dots", matmul outputs) are kept for the backward pass.
- `apply_scan(model)`: the decoder runs runs of structurally identical layers with
  `jax.lax.scan` over their stacked parameters, so XLA compiles one layer body per run instead
  of one per layer (compile time); the KV-cache path (inference) keeps the plain loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.models.text import TextModel
from qwenvl_jax.sharding import shard

BLOCK_LISTS = ("layers", "blocks", "resblocks")

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _remat_class(cls: type, policy: str) -> type:
    base_call = cls.__call__
    checkpoint_policy = POLICIES[policy]

    def __call__(self, *args, **kwargs):
        graphdef, state = nnx.split(self)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = [isinstance(x, jax.Array | np.ndarray) for x in leaves]
        arrays = [x for x, a in zip(leaves, is_array) if a]

        def run(state, arrays):
            it = iter(arrays)
            full = [next(it) if a else x for x, a in zip(leaves, is_array)]
            a, kw = jax.tree.unflatten(treedef, full)
            return base_call(nnx.merge(graphdef, state), *a, **kw)

        return jax.checkpoint(run, policy=checkpoint_policy, prevent_cse=True)(state, arrays)

    return type(
        f"Remat{cls.__name__}", (cls,), {"__call__": __call__, "__module__": cls.__module__}
    )


def blocks_of(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every transformer block: items of a `layers`/`blocks`/`resblocks` list."""
    return [
        (path, m)
        for path, m in nnx.iter_modules(model)
        if len(path) >= 2 and isinstance(path[-1], int) and path[-2] in BLOCK_LISTS
    ]


def apply_remat(model: nnx.Module, policy: str) -> int:
    """Run every block under `jax.checkpoint` with `policy` ("none" leaves the model as is).
    Returns the number of blocks changed."""
    if policy == "none":
        return 0
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r} (use one of {sorted(POLICIES)})")
    blocks = blocks_of(model)
    for _, block in blocks:
        cls = type(block)
        if cls.__name__.startswith("Remat"):
            cls = cls.__mro__[1]
        block.__class__ = _remat_class(cls, policy)
    return len(blocks)


class ScannedTextModel(TextModel):
    """TextModel whose no-cache forward scans runs of identical layers (see the module doc)."""

    def __call__(
        self,
        embeds,
        position_ids,
        segment_ids,
        *,
        slots=None,
        cache=None,
        cache_index=None,
        deepstack=None,
        ntk_alpha: float = 1.0,
    ):
        if cache is not None:
            return super().__call__(
                embeds,
                position_ids,
                segment_ids,
                slots=slots,
                cache=cache,
                cache_index=cache_index,
                deepstack=deepstack,
                ntk_alpha=ntk_alpha,
            )
        B, T, _ = embeds.shape
        x = shard(embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        angles = self.rope(position_ids, ntk_alpha)
        start = 0 if cache_index is None else cache_index
        if slots is None:
            slots = jnp.broadcast_to(start + jnp.arange(T), (B, T))
        n_deep = 0 if deepstack is None else deepstack.shape[0]
        router: list[jax.Array] = []
        for lo, hi in _runs(self.layers, n_deep):
            ds = deepstack[lo:hi] if lo < n_deep else None
            if hi - lo == 1:
                x, _, rl = self.layers[lo](x, angles, segment_ids, slots, None, None, start)
                if ds is not None:
                    x = x + ds[0].astype(x.dtype)
                router += [] if rl is None else [rl]
                continue
            graphdef = nnx.graphdef(self.layers[lo])
            stacked = jax.tree.map(
                lambda *a: jnp.stack(a), *[nnx.state(self.layers[i]) for i in range(lo, hi)]
            )

            def body(x, xs, graphdef=graphdef):
                state, d = xs
                x, _, rl = nnx.merge(graphdef, state)(
                    x, angles, segment_ids, slots, None, None, start
                )
                if d is not None:
                    x = x + d.astype(x.dtype)
                return x, rl

            x, rls = jax.lax.scan(body, x, (stacked, ds))
            if rls is not None:
                router += list(rls)
        return self.norm(x), None, router


def _runs(layers, n_deep: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive layers with the same structure (and the same DeepStack
    role: layers below n_deep get a DeepStack addition)."""
    keys = [(nnx.graphdef(layer), i < n_deep) for i, layer in enumerate(layers)]
    runs, lo = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[lo]:
            runs.append((lo, i))
            lo = i
    return runs


def apply_scan(model: nnx.Module) -> int:
    """Scan the decoder layers of every TextModel in `model`. Returns how many were changed."""
    n = 0
    for _, m in nnx.iter_modules(model):
        if type(m) is TextModel:
            m.__class__ = ScannedTextModel
            n += 1
    return n


def configure(model: nnx.Module, remat: str = "none", scan_layers: bool = False) -> dict[str, Any]:
    """Apply the run's remat policy and layer scanning; returns what was changed (for the log)."""
    return {
        "remat_blocks": apply_remat(model, remat),
        "scanned_decoders": apply_scan(model) if scan_layers else 0,
    }


__all__ = ["POLICIES", "ScannedTextModel", "apply_remat", "apply_scan", "blocks_of", "configure"]
