"""Staged freezing through the shipped stage configs: after training steps the frozen parameters
are bit-identical, every trainable one has changed, and neither the optimiser state nor the
gradient has an entry for a frozen parameter."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.models.mtp import CarriedParam
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import from_dict, read_file, stage_config_path
from qwenvl_jax.train.freeze import path_str
from qwenvl_jax.train.step import Trainer
from qwenvl_jax.train.synthetic import SyntheticBatches


def host_params(state: nnx.State) -> dict[str, np.ndarray]:
    return {
        path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state)
    }


def param_paths_in(tree) -> set[str]:
    """Dotted parameter paths of the array leaves of an optimiser state."""
    out = set()
    for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(k.key) for k in kp if isinstance(k, jax.tree_util.DictKey)]
        if keys and np.ndim(leaf) > 0:
            out.add(".".join(keys))
    return out


# (family, stage, batch rows, sequence length): Qwen-VL v1 images take 258 positions each
CASES = [("qwen3_vl", 1, 2, 64), ("qwen2_5_vl", 3, 2, 64), ("qwen_vl", 3, 1, 288)]
CASES += [("qwen3_5", 3, 2, 80), ("qwen3_5_moe", 1, 2, 80)]  # Qwen3.5: two delta-rule chunks


@pytest.mark.parametrize("family, stage, rows, seq", CASES)
def test_frozen_parameters_stay_bit_identical(family, stage, rows, seq):
    cfg = load_config(f"tiny_{family}")
    mesh = make_mesh(devices=jax.devices()[:1])
    table = read_file(stage_config_path(family, stage))["freeze"]
    tc = from_dict(
        {
            "freeze": table,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "steps": 10,
            "batch_size": rows,
            "seq_len": seq,
            "weight_decay": 0.1,
        }
    )
    model = build_model(cfg, mesh=mesh)
    # Qwen3.5's multi-token-prediction weights are carried along untouched
    before = host_params(nnx.state(model, nnx.Any(nnx.Param, CarriedParam)))
    trainer = Trainer(model, tc, mesh)
    frozen_paths = {p for p, train in trainer.mask.items() if not train}
    trainable_paths = set(trainer.mask) - frozen_paths
    assert frozen_paths and trainable_paths
    state = trainer.init_state()
    data = SyntheticBatches(cfg, rows, seq, seed=3)
    for _ in range(2):
        state, metrics = trainer.step(state, next(data))
        assert np.isfinite(float(metrics["loss"]))
    after = {**host_params(state["params"]), **host_params(trainer.frozen)}
    assert set(after) == set(before)
    carried = set(before) - set(trainer.mask)
    assert bool(carried) == (cfg.text.mtp_num_hidden_layers > 0)
    for p in frozen_paths | carried:
        assert after[p].tobytes() == before[p].tobytes(), f"{p} changed"
    for p in trainable_paths:
        assert not np.array_equal(after[p], before[p]), f"{p} did not train"
    # the optimiser holds moments for exactly the trainable parameters, and the gradient the
    # step takes is over them alone (its shapes, without compiling it again)
    assert param_paths_in(state["opt_state"]) == trainable_paths
    batch = trainer.put_batch(next(data))
    grads = jax.eval_shape(
        jax.grad(lambda p: trainer.loss(p, trainer.frozen, batch)[0]), state["params"]
    )
    assert {path_str(p) for p, _ in nnx.to_flat_state(grads)} == trainable_paths
