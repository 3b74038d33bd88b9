"""The optimiser of a stage: AdamW with linear warmup then cosine decay, weight decay masked off
norms and biases, global-norm clipping, per-parameter learning-rate factors (`lr_scale`), and
gradient accumulation (`optax.MultiSteps`).

It is built over the trainable state only (see train/freeze.py), so frozen parameters hold no
optimiser state. Moments are kept in the dtype of the master weights (`param_dtype`).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax.sharding import axes_of
from qwenvl_jax.train.config import TrainConfig
from qwenvl_jax.train.freeze import first_match, path_str


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine to end_learning_rate_ratio * peak at
    `steps` (counted in optimiser steps)."""
    peak = cfg.learning_rate
    end = peak * cfg.end_learning_rate_ratio
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(
            peak, max(cfg.steps, 1), alpha=cfg.end_learning_rate_ratio
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=end,
    )


def decay_mask(params: nnx.State, no_decay: tuple[str, ...] = ()) -> nnx.State:
    """True for parameters that get weight decay: matrices (and stacked expert tensors), not norm
    scales or biases (1-D per layer: the "layers" axis of stacked decoder layers is not counted),
    nor paths matching a `no_decay` regex."""
    rx = [re.compile(p) for p in no_decay]

    def decays(path: str, v) -> bool:
        per_layer = v.ndim - (axes_of(v)[:1] == ("layers",))
        return per_layer >= 2 and not any(r.fullmatch(path) for r in rx)

    return nnx.from_flat_state(
        [(p, v.replace(decays(path_str(p), v))) for p, v in nnx.to_flat_state(params)]
    )


def lr_factors(params: nnx.State, table: tuple[tuple[str, float], ...]) -> nnx.State:
    """The learning-rate factor of every parameter of `params`: that of the first `table` row
    whose regex fully matches its path, 1.0 where none does. A row that matches no parameter is
    an error (a typo, or a table written for another family)."""
    flat = nnx.to_flat_state(params)
    rows = first_match(
        [path_str(p) for p, _ in flat], [p for p, _ in table], "lr_scale", "trainable parameter"
    )
    return nnx.from_flat_state(
        [
            (p, v.replace(1.0 if rows[path_str(p)] is None else float(table[rows[path_str(p)]][1])))
            for p, v in flat
        ]
    )


def scale_by_factors(factors: nnx.State) -> optax.GradientTransformation:
    """Multiply each parameter's update by its constant factor (a tree like the updates)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """The optax transformation for the trainable state `params` (concrete or abstract)."""
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(params, cfg.no_decay),
        )
    )
    if cfg.lr_scale:
        parts.append(scale_by_factors(lr_factors(params, cfg.lr_scale)))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def opt_state_shardings(
    tx: optax.GradientTransformation,
    abstract_state,
    param_shardings,
    replicated: jax.sharding.Sharding,
):
    """Shardings of an optimiser state: parameter-shaped entries (moments, accumulated
    gradients) like their parameter, counters and scalars replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )


__all__ = [
    "decay_mask",
    "learning_rate_schedule",
    "lr_factors",
    "make_optimizer",
    "opt_state_shardings",
    "scale_by_factors",
]
