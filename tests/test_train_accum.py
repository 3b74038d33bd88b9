"""Gradient accumulation (optax.MultiSteps): the parameters move every grad_accum-th micro-batch,
by the optimiser's update for the mean gradient of the micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.freeze import path_str
from qwenvl_jax.train.optim import make_optimizer
from qwenvl_jax.train.step import Trainer
from qwenvl_jax.train.synthetic import SyntheticBatches


def host_params(state: nnx.State) -> dict[str, np.ndarray]:
    return {
        path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)
    }


def _as_state(flat: dict[str, np.ndarray], like: nnx.State) -> nnx.State:
    return nnx.from_flat_state(
        [(p, v.replace(jnp.asarray(flat[path_str(p)]))) for p, v in nnx.to_flat_state(like)]
    )


def test_gradient_accumulation_applies_the_mean_gradient_every_k_calls():
    cfg = load_config("tiny_qwen2_vl")
    mesh = make_mesh(devices=jax.devices()[:1])
    data = SyntheticBatches(cfg, 2, 64, seed=13)
    b1, b2 = next(data), next(data)
    # eps = 1e-3 keeps Adam's update a smooth function of the gradient (with 1e-8 it is nearly
    # sign(g) for tiny g, and the last-bit differences between two compiles would show)
    tc = from_dict(
        {
            "freeze": [[".*", "train"]],
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "steps": 10,
            "batch_size": 2,
            "seq_len": 64,
            "grad_accum": 2,
            "weight_decay": 0.1,
            "eps": 1e-3,
        }
    )
    trainer = Trainer(build_model(cfg, mesh=mesh), tc, mesh)
    p0 = host_params(trainer._initial_params)
    grad = jax.jit(jax.grad(lambda p, f, b: trainer.loss(p, f, b)[0]))
    g1 = grad(trainer._initial_params, trainer.frozen, trainer.put_batch(b1))
    g2 = grad(trainer._initial_params, trainer.frozen, trainer.put_batch(b2))
    state = trainer.init_state()
    state, _ = trainer.step(state, b1)
    after_one = host_params(state["params"])
    assert all(after_one[k].tobytes() == p0[k].tobytes() for k in p0)
    state, _ = trainer.step(state, b2)
    # the same update as the un-accumulated optimiser's on the mean gradient
    start = _as_state(p0, state["params"])
    tx = make_optimizer(tc.replace(grad_accum=1), start)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected = host_params(
        jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(mean, start)
    )
    got = host_params(state["params"])
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
