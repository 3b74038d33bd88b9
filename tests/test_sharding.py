"""Sharded equals unsharded: the tiny models on 8 simulated CPU devices, mesh (data=2, fsdp=2,
tensor=2), give the logits of one device. Runs in a subprocess because the device count must be
set before jax starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_jax.sharding import MESH_AXES, logical_to_spec

SCRIPT = r"""
import sys, tempfile
import numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
from flax import nnx
import qwenvl_jax as qj
from qwenvl_jax.sharding import make_mesh, use_mesh
from hf_models import build_inputs, hf_model

family = sys.argv[1]
folder = tempfile.mkdtemp()
hf_model(family).save_pretrained(folder)
prompts = [{"text": list(range(10, 30)), "images": [(4, 4)]},
           {"text": list(range(40, 47)), "images": [(6, 8)]}]
inputs = build_inputs(family, prompts)
single = np.asarray(qj.from_pretrained(folder, dtype="float32")(**inputs))

mesh = make_mesh(data=2, fsdp=2, tensor=2)
model = qj.from_pretrained(folder, dtype="float32", mesh=mesh)
specs = {str(p): v.get_raw_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(model))}
sharded = [k for k, s in specs.items() if any(a is not None for a in s)]
assert len(sharded) > len(specs) // 2, (len(sharded), len(specs))
q = model.language_model.runs[0].self_attn.q_proj.kernel.get_raw_value()
assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
assert len(q.addressable_shards) == 8
assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)

x = model.prepare(**inputs)
@nnx.jit
def fwd(model, ids, seg, pos, vision):
    return model.forward(ids, seg, pos, vision)[0]
with use_mesh(mesh):
    out = np.asarray(fwd(model, x.input_ids, x.segment_ids, x.position_ids, x.vision))
m = inputs["attention_mask"].astype(bool)
err = np.abs(out - single)[m].max() / max(1.0, np.abs(single[m]).max())
print("max rel err", err)
assert err < 1e-5, err
"""


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_sharded_equals_single_device(family):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join(
            [
                str(Path(__file__).parent),
                str(Path(__file__).parents[1]),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    )
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, family], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "max rel err" in r.stdout


def test_rules_refuse_one_mesh_axis_twice():
    with pytest.raises(ValueError, match="used twice"):
        logical_to_spec(("embed", "expert_embed"))  # both map to fsdp


def test_rules_replicate_indivisible_dims():
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), MESH_AXES)
    assert logical_to_spec(("vocab", "embed"), (8, 8), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (7, 8), mesh) == P(None, "fsdp")


def test_an_indivisible_parameter_is_an_error_naming_it():
    """A parameter must not end up whole on every device unnoticed: building a model on a mesh
    whose tensor axis does not divide one of its dimensions names that parameter."""
    import jax

    from qwenvl_jax.config import load_config
    from qwenvl_jax.errors import ConfigError
    from qwenvl_jax.modeling import build_model

    mesh = jax.sharding.AbstractMesh((1, 1, 3, 1), MESH_AXES)
    with pytest.raises(
        ConfigError,
        match=r"parameter language_model\.embed_tokens\.embedding: dimension \d+ \(\w+, size \d+\)",
    ):
        build_model(load_config("tiny_qwen2_vl"), abstract=True, mesh=mesh)
    assert logical_to_spec(("vocab",), (7,), mesh) == jax.sharding.PartitionSpec(None)
