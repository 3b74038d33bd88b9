"""The jitted train step over the (data, fsdp, tensor, expert) mesh.

The model state is split once into trainable parameters, frozen parameters and the graph
(train/freeze.py). The train state is `{"step", "params", "opt_state"}`, sharded by the logical
axes of each parameter (optimiser moments like their parameter); the frozen parameters are a
separate, never donated, never differentiated input. A batch (qwenvl_jax/data/batch.py) is
sharded over the batch axes. The loss is the token cross-entropy over `loss_mask`, averaged over
the counted tokens, plus `aux_loss_coef` times the MoE load-balancing loss (Qwen3-VL-MoE).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenvl_jax.data.batch import TEXT_KEYS, V1_PIXELS, batch_to_model_inputs, row_axis
from qwenvl_jax.layers.moe import load_balancing_loss
from qwenvl_jax.sharding import logical_to_spec, state_shardings, use_mesh
from qwenvl_jax.train.config import TrainConfig
from qwenvl_jax.train.freeze import split_trainable
from qwenvl_jax.train.optim import learning_rate_schedule, make_optimizer, opt_state_shardings

log = logging.getLogger(__name__)

TrainState = dict  # {"step": int32[], "params": nnx.State, "opt_state": optax state}


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over mask, number of counted tokens), in float32.
    logits: float[B, T, V]; targets: int[B, T]; mask: float[B, T]."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def chunked_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(logits_fn(hidden), targets, mask)` computed `chunk` positions of each row
    at a time, each chunk's logits recomputed in the backward pass: the float32 logits held at
    once are [B, chunk, V], not [B, T, V] (2.5 GB a 4096-token row at Qwen's 151,936 ids).
    hidden: float[B, T, D]; chunk <= 0 or >= T: one pass."""
    T = hidden.shape[1]
    if chunk <= 0 or chunk >= T:
        return cross_entropy(logits_fn(hidden), targets, mask)
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def split(x: jax.Array) -> jax.Array:  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(carry, xs):
        h, t, m = xs
        total, count = cross_entropy(logits_fn(h), t, m)
        return (carry[0] + total, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(
        one, (zero, zero), (split(hidden), split(targets), split(mask))
    )
    return total, count


def global_batch_shape(key: str, local: tuple[int, ...], processes: int) -> tuple[int, ...]:
    """The global shape of batch entry `key` whose share on each of `processes` processes has
    shape `local`: the rows (axis 1 of position_ids, axis 0 of the rest) and patch groups are
    split between the processes; Qwen-VL v1's pictures are whole on each."""
    if key == V1_PIXELS or processes == 1:
        return tuple(local)
    shape = list(local)
    shape[row_axis(key)] *= processes
    return tuple(shape)


class Trainer:
    """The train step of one run: state layout, shardings and the compiled step.

    `model` is the built (possibly remat/scan configured) model; its parameters are split by
    `cfg.freeze`. Usage: `state = trainer.init_state()`, then
    `state, metrics = trainer.step(state, batch)` per micro-batch.
    """

    def __init__(self, model: nnx.Module, cfg: TrainConfig, mesh: Mesh):
        self.cfg = cfg
        self.mesh = mesh
        self.config = model.config
        self.graphdef, params, frozen, self.mask = split_trainable(model, cfg.freeze)
        self.tx = make_optimizer(cfg, params)
        self.schedule = learning_rate_schedule(cfg)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        param_sh = state_shardings(params, mesh)
        self.frozen_shardings = state_shardings(frozen, mesh)
        abs_opt = jax.eval_shape(self.tx.init, params)
        self.state_shardings = {
            "step": self.replicated,
            "params": param_sh,
            "opt_state": opt_state_shardings(self.tx, abs_opt, param_sh, self.replicated),
        }
        self._initial_params: nnx.State | None = params
        self._abstract_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_sh
        )
        self.frozen = frozen
        text = model.config.text
        self.moe_top_k = text.num_experts_per_tok if text.num_experts else 0
        coef = cfg.aux_loss_coef
        self.aux_coef = float(text.router_aux_loss_coef if coef is None else coef)
        self._compiled = None

    # -- state ---------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """Step 0: the model's trainable parameters and a fresh optimiser state (once: the
        state is donated to the step)."""
        params, self._initial_params = self._initial_params, None
        if params is None:
            raise RuntimeError("init_state() was called already")
        init = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])
        opt_state = init(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return {"step": step, "params": params, "opt_state": opt_state}

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        shapes = {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": self._abstract_params,
            "opt_state": jax.eval_shape(self.tx.init, self._abstract_params),
        }
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            shapes,
            self.state_shardings,
        )

    def abstract_frozen(self) -> nnx.State:
        """ShapeDtypeStructs with shardings of the frozen parameters (a restore target)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.frozen,
            self.frozen_shardings,
        )

    def set_frozen(self, frozen: nnx.State) -> None:
        """Frozen parameters from a checkpoint (the state comes from it too: the initial
        parameters are dropped)."""
        self.frozen = frozen
        self._initial_params = None

    def model(self, state: TrainState) -> nnx.Module:
        """The full model (trained + frozen parameters) of a state."""
        return nnx.merge(self.graphdef, state["params"], self.frozen)

    def learning_rate(self, optimizer_step: int) -> float:
        return float(self.schedule(optimizer_step))

    # -- batches -------------------------------------------------------------------------------
    def batch_sharding(self, key: str, shape: tuple[int, ...]) -> NamedSharding:
        if key == "position_ids":
            axes = (None, "batch", "length")
        elif key in TEXT_KEYS:
            axes = ("batch", "length")
        elif key == V1_PIXELS:  # Qwen-VL v1's pictures: replicated
            return self.replicated
        else:  # the patch groups: split over the data axes as the rows they belong to
            axes = ("vit_groups",) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, logical_to_spec(axes, shape, self.mesh))

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a batch (its rows and their patch groups) -> global device
        arrays sharded over the batch axes. Each process holds an equal share, so the global
        batch has `process_count` times the local rows and groups; the shardings are those of
        the global shapes."""
        batch = {k: np.asarray(v) for k, v in batch.items()}
        if jax.process_count() > 1 and V1_PIXELS in batch:
            batch[V1_PIXELS] = self._all_pictures(batch)
        out = {}
        for k, v in batch.items():
            shape = global_batch_shape(k, v.shape, jax.process_count())
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding(k, shape), v, shape)
        return out

    def _all_pictures(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """Qwen-VL v1's pictures of the global batch, the same on every process: they are
        replicated and spliced at the `<img>` spans in row-major order of the global batch, while
        each process holds only its own rows' pictures (then padding). Every process's are
        gathered and laid out in the order of their rows in the global batch, then padding."""
        from jax.experimental import multihost_utils

        ids = batch["input_ids"]
        shape = global_batch_shape("input_ids", ids.shape, jax.process_count())
        where = self.batch_sharding("input_ids", shape).addressable_devices_indices_map(shape)
        first_row = min(index[0].start or 0 for index in where.values())
        count = int(np.sum(ids == self.config.vision.image_start_id))
        rows = multihost_utils.process_allgather(np.asarray([first_row, count], np.int64))
        pixels = np.asarray(multihost_utils.process_allgather(batch[V1_PIXELS]))
        out = np.zeros((pixels.shape[0] * pixels.shape[1], *pixels.shape[2:]), pixels.dtype)
        k = 0
        for p in np.argsort(rows[:, 0], kind="stable"):
            n = int(rows[p, 1])
            out[k : k + n] = pixels[p, :n]
            k += n
        return out

    # -- the step ------------------------------------------------------------------------------
    def loss(
        self, params: nnx.State, frozen: nnx.State, batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = nnx.merge(self.graphdef, params, frozen)
        input_ids, segment_ids, position_ids, vision = batch_to_model_inputs(batch)
        hidden, _, router = model.forward(
            input_ids, segment_ids, position_ids, vision, return_hidden=True
        )
        ce_sum, count = chunked_cross_entropy(
            model.logits, hidden, batch["targets"], batch["loss_mask"], self.cfg.loss_chunk
        )
        ce = ce_sum / jnp.maximum(count, 1.0)
        aux = jnp.zeros((), jnp.float32)
        if router and self.moe_top_k:
            valid = (segment_ids > 0).reshape(-1)
            aux = load_balancing_loss(jnp.stack(router), self.moe_top_k, valid)
        loss = ce + self.aux_coef * aux
        return loss, {
            "ce": ce,
            "aux_loss": aux,
            "loss_tokens": count,
            "tokens": jnp.sum(segment_ids > 0).astype(jnp.float32),
        }

    def _step(self, state: TrainState, frozen: nnx.State, batch: Mapping[str, jax.Array]):
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state["params"], frozen, batch
        )
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def compile(
        self, state: TrainState, batch: Mapping[str, jax.Array], frozen: Any = None
    ) -> jax.stages.Compiled:
        """Compile the step for these inputs (arrays, or abstract arrays with shardings: `plan`
        compiles for devices it does not have) and keep it; `frozen` defaults to the trainer's."""
        in_sh = (
            self.state_shardings,
            self.frozen_shardings,
            {k: v.sharding for k, v in batch.items()},
        )
        jitted = jax.jit(
            self._step,
            in_shardings=in_sh,
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        t = time.perf_counter()
        with use_mesh(self.mesh):
            self._compiled = jitted.lower(
                state, self.frozen if frozen is None else frozen, batch
            ).compile()
        log.info("train step compiled in %.1f s", time.perf_counter() - t)
        return self._compiled

    def ensure_compiled(self, state: TrainState, batch: Mapping[str, jax.Array]) -> None:
        if self._compiled is None:
            self.compile(state, batch)

    def step(
        self, state: TrainState, batch: Mapping[str, Any]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One micro-batch: forward, backward and the optimiser (which, with gradient
        accumulation, applies the mean gradient on every grad_accum-th call). Donates `state`."""
        if any(not isinstance(v, jax.Array) for v in batch.values()):
            batch = self.put_batch(batch)
        if self._compiled is None:
            self.compile(state, batch)
        return self._compiled(state, self.frozen, batch)


__all__ = [
    "Trainer",
    "TrainState",
    "chunked_cross_entropy",
    "cross_entropy",
    "global_batch_shape",
]
