"""The train step on 8 simulated CPU devices (data=2, fsdp=2, tensor=2) gives the loss and the
parameter updates of one device, with the parameters and moments really sharded.

Runs in a subprocess: the device count must be set (XLA_FLAGS) before JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import jax
import numpy as np
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")
from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.step import Trainer
from qwenvl_jax.train.synthetic import SyntheticBatches

assert len(jax.devices()) == 8
cfg = load_config("tiny_qwen3_vl_moe")
# eps = 1e-3: Adam's update is then a smooth function of the gradient (with 1e-8 it is close to
# sign(g) for near-zero gradients, which would magnify reduction-order differences)
run = from_dict({"freeze": [[r"visual\.runs\..*", "freeze"], [".*", "train"]],
                 "learning_rate": 1e-3, "warmup_steps": 0, "steps": 10, "batch_size": 4,
                 "seq_len": 40, "eps": 1e-3})
data = SyntheticBatches(cfg, 4, 40, seed=1)
batches = [next(data) for _ in range(2)]


def flat(state):
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(state)}


out = {}
for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(2, 2, 2, 1))):
    trainer = Trainer(build_model(cfg, mesh=mesh, seed=0), run, mesh)
    state = trainer.init_state()
    before = flat(state["params"])
    losses = []
    for b in batches:
        state, m = trainer.step(state, b)
        losses.append(float(m["loss"]))
    after = flat(state["params"])
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state)})
    out[name] = {"losses": losses, "specs": specs,
                 "updates": {k: (after[k] - before[k]).tolist() for k in after},
                 "before": {k: before[k].tolist() for k in before}}
json.dump(out, sys.stdout)
"""


def test_eight_devices_give_the_loss_and_updates_of_one():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    one, eight = out["one"], out["eight"]
    # sharded for real: parameters and moments split over fsdp and tensor
    assert any("fsdp" in s for s in eight["specs"]) and any("tensor" in s for s in eight["specs"])
    assert not any("fsdp" in s or "tensor" in s for s in one["specs"])
    # same start, same losses (float32 reductions in another order: 1e-6)
    for k in one["before"]:
        assert np.array_equal(np.asarray(one["before"][k]), np.asarray(eight["before"][k])), k
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-6)
    # same updates after two steps: within 1e-4 of the tensor's largest update, plus the float32
    # rounding of the parameter the update was added to
    for k, u1 in one["updates"].items():
        u1, u8 = np.asarray(u1), np.asarray(eight["updates"][k])
        p = np.abs(np.asarray(one["before"][k]) + u1)
        assert np.abs(u1).max() > 0, k
        bound = 1e-4 * np.abs(u1).max() + 2 * np.finfo(np.float32).eps * p
        assert np.all(np.abs(u8 - u1) <= bound), k
