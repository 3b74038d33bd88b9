"""Qwen-VL v1 sharded equals unsharded: the fixture checkpoint on 8 simulated CPU devices, mesh
(data=2, fsdp=2, tensor=2), gives the logits of one device for a batch with images. Runs in a
subprocess because the device count must be set before jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.checkpoints import v1_checkpoint

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_v1_tiny"

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="the shared fixture is missing")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return v1_checkpoint(tmp_path_factory)


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    import qwenvl_jax as qj
    from qwenvl_jax.sharding import RULES, make_mesh, use_mesh

    ckpt, npz = sys.argv[1], sys.argv[2]
    d = np.load(npz)
    ids = np.repeat(d["input_ids"], 4, axis=0)
    px = np.repeat(d["pixel_values"], 4, axis=0)

    def logits(model, mesh):
        x = model.prepare(ids, pixel_values=px)
        fn = jax.jit(lambda s, a, b, c, v: nnx.merge(*s).forward(a, b, c, v)[0])
        with jax.default_matmul_precision("highest"), use_mesh(mesh):
            return np.asarray(fn(nnx.split(model), x.input_ids, x.segment_ids, x.position_ids,
                                 x.vision))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # the fixture's ViT MLP is 315 wide, which 2 does not divide: that axis stays whole, by rule
    rules = [(name, None if name == "vit_mlp" else axes) for name, axes in RULES]
    with use_mesh(mesh, rules):
        sharded = qj.from_pretrained(ckpt, dtype="float32", mesh=mesh)
    specs = {k: str(v.sharding.spec) for k, v in (
        ("lm_head", sharded.lm_head.kernel[...]),
        ("vit_in_proj", sharded.visual.resblocks[0].attn.in_proj.kernel[...]),
        ("q_proj", sharded.language_model.runs[0].self_attn.q_proj.kernel[...]))}
    devices = len(sharded.lm_head.kernel[...].sharding.device_set)
    flat = nnx.to_flat_state(nnx.state(sharded))
    split = sum(any(a is not None for a in v.get_raw_value().sharding.spec) for _, v in flat)
    a = logits(sharded, mesh)
    single = qj.from_pretrained(ckpt, dtype="float32")
    b = logits(single, None)
    print(json.dumps({"specs": specs, "devices": devices, "split": split, "params": len(flat),
                      "max_diff": float(np.abs(a - b).max()),
                      "max_abs": float(np.abs(b).max()),
                      "rows_equal": bool(np.allclose(a[0], a[3]))}))
""")


def test_sharded_equals_unsharded_on_8_devices(checkpoint):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    npz = FIXTURE / "expected" / "coffee_grounding.npz"
    run = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(checkpoint), str(npz)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["split"] > result["params"] // 2, result  # most parameters really are split
    assert "tensor" in result["specs"]["lm_head"] and "fsdp" in result["specs"]["lm_head"]
    assert "tensor" in result["specs"]["vit_in_proj"] and "tensor" in result["specs"]["q_proj"]
    assert result["rows_equal"]
    assert result["max_diff"] <= 1e-4 * max(1.0, result["max_abs"])
