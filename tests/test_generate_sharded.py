"""qj.generate on a model sharded over 8 simulated CPU devices (data 2 x fsdp 2 x tensor 2) gives
the tokens of the unsharded model. Runs in a subprocess: the device count is fixed at JAX start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import session_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
import numpy as np
from PIL import Image
import qwenvl_jax as qj
from qwenvl_jax.sharding import make_mesh

folder, media = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
convs = []
for i, (w, h) in enumerate([(100, 70), (60, 90)]):
    path = f"{media}/picture{i}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    convs.append([{"role": "user", "content": [{"type": "image", "image": path},
                                               {"type": "text", "text": "Describe." * (i + 1)}]}])
processor = qj.Processor.from_pretrained(folder)
plain = qj.from_pretrained(folder, dtype="float32")
mesh = make_mesh(data=2, fsdp=2, tensor=2, expert=1)
sharded = qj.from_pretrained(folder, dtype="float32", mesh=mesh)
devices = {len(x.sharding.device_set) for x in jax.tree.leaves(nnx.state(sharded))}
result = {"devices": sorted(devices)}
for name, model in (("plain", plain), ("sharded", sharded)):
    out = qj.generate(model, processor, convs, max_new_tokens=24, do_sample=False,
                      repetition_penalty=1.0)  # plain greedy: the released config samples
    result[name] = [o.token_ids for o in out]
print(json.dumps(result))
"""


def test_sharded_generation_equals_unsharded(tmp_path_factory, tmp_path):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(result["devices"]) == 8
    assert [len(t) for t in result["plain"]] == [24, 24]
    assert result["sharded"] == result["plain"]
