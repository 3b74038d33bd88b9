"""The train step's options: remat and scanned layers change nothing but memory and compile time,
and bf16 compute keeps float32 master weights and optimiser state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_stacked_layers import DECAY, _run

from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.blocks import configure
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.freeze import path_str
from qwenvl_jax.train.step import Trainer
from qwenvl_jax.train.synthetic import SyntheticBatches


@functools.cache
def mesh():
    return make_mesh(devices=jax.devices()[:1])


def run_config(**kw):
    base = {"learning_rate": 1e-2, "warmup_steps": 0, "steps": 10, "batch_size": 2, "seq_len": 64}
    return from_dict({**base, **kw})


def host_params(state: nnx.State) -> dict[str, np.ndarray]:
    return {
        path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)
    }


def _hybrid_8():
    """Tiny Qwen3.5 with 8 layers: the pattern linear x3, full scanned as one group twice."""
    cfg = load_config("tiny_qwen3_5")
    types = ("linear_attention",) * 3 + ("full_attention",)
    text = dataclasses.replace(cfg.text, num_hidden_layers=8, layer_types=types * 2)
    return dataclasses.replace(cfg, text=text)


@pytest.mark.parametrize("name", ["tiny_qwen3_vl", "hybrid_8"])
def test_remat_and_scanned_layers_give_the_same_loss_and_gradients(name):
    """Qwen3-VL (DeepStack features enter inside the scanned run) and a hybrid Qwen3.5 whose
    4-layer pattern is one scanned group (each layer rematerialised on its own): the remat
    policies under the scan body change nothing; `scan_layers` is accepted and the decoder is
    always scanned."""
    cfg = _hybrid_8() if name == "hybrid_8" else load_config(name)
    base = build_model(cfg, mesh=mesh())
    graphdef, weights = nnx.split(base)
    host = jax.device_get(weights)
    batch = next(SyntheticBatches(cfg, 2, 64, seed=7))
    out = {}
    policies = (("none", False), ("full", True), ("dots", False))
    if name == "hybrid_8":  # a policy of each kind (the dots one is Qwen3-VL's): CI time
        policies = policies[:2]
    for remat, scan in policies:
        model = nnx.merge(graphdef, jax.device_put(host))
        changed = configure(model, remat, scan)
        assert changed["scanned_decoders"] == 1
        blocks = cfg.text.num_hidden_layers + cfg.vision.depth
        assert changed["remat_blocks"] == (0 if remat == "none" else blocks)
        trainer = Trainer(model, run_config(freeze=[[".*", "train"]]), mesh())
        dev = trainer.put_batch(batch)
        loss, grads = jax.jit(jax.value_and_grad(_loss_of(trainer)))(
            trainer._initial_params, trainer.frozen, dev
        )
        out[(remat, scan)] = (float(loss), host_params(grads))
    ref_loss, ref_grads = out[("none", False)]
    for key, (loss, grads) in out.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(key))
        for p, g in grads.items():
            scale = max(np.abs(ref_grads[p]).max(), 1e-12)
            if DECAY.search(p):  # float32 cancellation: measured as in test_stacked_layers.py
                scale = max(np.abs(v).max() for q, v in ref_grads.items() if _run(q) == _run(p))
            assert np.abs(g - ref_grads[p]).max() / scale < 1e-5, (key, p)


def test_bf16_compute_keeps_float32_master_weights():
    cfg = load_config("tiny_qwen2_vl")
    batch = next(SyntheticBatches(cfg, 2, 64, seed=11))
    f32 = Trainer(
        build_model(cfg, mesh=mesh(), dtype="float32", seed=0),
        run_config(freeze=[[".*", "train"]]),
        mesh(),
    )
    f32_loss = float(jax.jit(_loss_of(f32))(f32._initial_params, f32.frozen, f32.put_batch(batch)))
    model = build_model(cfg, mesh=mesh(), dtype="bfloat16", param_dtype="float32", seed=0)
    trainer = Trainer(model, run_config(freeze=[[".*", "train"]]), mesh())
    before = host_params(trainer._initial_params)
    state = trainer.init_state()
    state, m = trainer.step(state, batch)
    # master weights and both AdamW moments stay float32, and they moved
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))
    after = host_params(state["params"])
    assert all(not np.array_equal(after[k], before[k]) for k in after)
    assert float(m["loss"]) != f32_loss  # the matmuls did run in bf16
    np.testing.assert_allclose(float(m["loss"]), f32_loss, rtol=2e-2)


def _loss_of(trainer: Trainer):
    return lambda p, f, b: trainer.loss(p, f, b)[0]
