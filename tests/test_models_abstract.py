"""`abstract=True` on every real config: the parameter counts of transformers, no weights read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import pytest

import qwenvl_jax as qj
from qwenvl_jax.config import load_config, presets

REF = Path(__file__).resolve().parents[2] / "shared" / "reference_configs"
COUNTS = json.loads((REF / "params.json").read_text()) if REF.exists() else {}


@pytest.mark.skipif(not COUNTS, reason="../shared/reference_configs is not beside the checkout")
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_abstract_param_count(name):
    start = time.perf_counter()
    model = qj.from_pretrained(REF / name, abstract=True)  # the folder holds config.json only
    assert qj.param_count(model) == COUNTS[name]["total"]
    leaves = jax.tree.leaves(qj.modeling.nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.sharding is not None for x in leaves)
    assert time.perf_counter() - start < 10


@pytest.mark.skipif(not COUNTS, reason="../shared/reference_configs is not beside the checkout")
def test_presets_equal_the_hub_configs():
    """Each preset in configs/models describes the same model as the hub config.json it is named
    after."""
    names = {p for p in presets() if not p.startswith("tiny")}
    checked = 0
    for folder in sorted(REF.iterdir()):
        preset = folder.name.split("__")[-1].lower().replace(".", "_").replace("-", "_")
        if preset in names:
            assert load_config(preset) == load_config(folder), preset
            checked += 1
    assert checked >= 10
