"""Qwen3.5-MoE sharded over 8 simulated CPU devices gives what one device gives (the script
takes Qwen3.5 too): the logits of a left-padded batch with images (float32, 1e-5 relative) and
32 greedy tokens through the cache (the delta rule's recurrent and convolution states included),
with the weights really split (fsdp 2 x tensor 2 x expert 2).

Runs in a subprocess: the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from flax import nnx
from hf_models import build_inputs, hf_model
from test_qwen3_5 import CASES, greedy
import qwenvl_jax as qj
from qwenvl_jax.sharding import make_mesh

family, folder = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 8
hf_model(family, seed=0).save_pretrained(folder)
inputs = build_inputs(family, CASES["padded_batch"], seed=5)
mesh = (make_mesh(data=2, fsdp=2, tensor=2, expert=1) if family == "qwen3_5"
        else make_mesh(data=1, fsdp=2, tensor=2, expert=2))
out = {}
for name, m in (("one", None), ("eight", mesh)):
    model = qj.from_pretrained(folder, dtype="float32", mesh=m)
    leaves = jax.tree.leaves(nnx.state(model))
    out[name] = {"logits": np.asarray(model(**inputs)).tolist(),
                 "tokens": greedy(model, inputs, 32).tolist(),
                 "specs": sorted({str(x.sharding.spec) for x in leaves}),
                 "devices": max(len(x.sharding.device_set) for x in leaves)}
out["mask"] = np.asarray(inputs["attention_mask"]).tolist()
print(json.dumps(out))
"""


# Qwen3.5-MoE only in CI (time): its mesh splits the hybrid decoder over fsdp and tensor and its
# experts over expert; the dense type runs the same code without the experts
@pytest.mark.parametrize("family", ["qwen3_5_moe"])
def test_eight_devices_equal_one(family, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, family, str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = out["one"], out["eight"]
    assert one["devices"] == 1 and eight["devices"] == 8
    axes = ("fsdp", "tensor") if family == "qwen3_5" else ("fsdp", "tensor", "expert")
    for axis in axes:  # the weights are really split over every axis of the mesh
        assert any(axis in s for s in eight["specs"]), axis
    mask = np.asarray(out["mask"])
    got, want = np.asarray(eight["logits"]), np.asarray(one["logits"])
    live = mask.astype(bool)
    err = np.abs(got - want)[live].max() / np.abs(want[live]).max()
    assert err < 1e-5, err
    assert len(np.unique(one["tokens"])) > 16  # not a degenerate repetition
    assert eight["tokens"] == one["tokens"]
