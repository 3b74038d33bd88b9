"""Qwen3-VL-MoE checkpoints that store one Linear per expert (as block-quantised FP8 ones do)
load as the fused layout does: same parameters, transformers' logits, and FP8 experts
dequantised with their own scales."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hf_models import build_inputs, hf_logits, hf_model
from safetensors.numpy import load_file, save_file

import qwenvl_jax as qj
from qwenvl_jax.modeling import params_as_numpy


def _split_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, t in tensors.items():
        if key.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H), as save_pretrained writes
            prefix, half = key[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :half]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, half:]
        elif key.endswith("mlp.experts.down_proj"):  # (E, H, I)
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    return out


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    ref = hf_model("qwen3_vl_moe")
    ref.save_pretrained(folder)
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(folder / "model.safetensors"))
    return ref, folder


def _copy_with(folder, dest, tensors, config_update=None):
    dest.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config.update(config_update or {})
    (dest / "config.json").write_text(json.dumps(config))
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_per_expert_checkpoint_loads_like_the_fused_one(fused, tmp_path):
    ref, folder = fused
    split = _split_experts(load_file(folder / "model.safetensors"))
    assert any(".experts.7.down_proj.weight" in k for k in split)
    per_expert = _copy_with(folder, tmp_path / "split", split)
    a = params_as_numpy(qj.from_pretrained(folder, dtype="float32"))
    b = params_as_numpy(qj.from_pretrained(per_expert, dtype="float32"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    inputs = build_inputs("qwen3_vl_moe", [{"text": list(range(10, 24)), "images": [(4, 6)]}])
    logits = np.asarray(qj.from_pretrained(per_expert, dtype="float32")(**inputs))
    expected = hf_logits(ref, inputs)
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4


def test_missing_expert_is_named(fused, tmp_path):
    _, folder = fused
    split = _split_experts(load_file(folder / "model.safetensors"))
    del split["model.language_model.layers.0.mlp.experts.3.up_proj.weight"]
    bad = _copy_with(folder, tmp_path / "bad", split)
    with pytest.raises(qj.CheckpointError, match=r"experts\.3\.up_proj"):
        qj.from_pretrained(bad, dtype="float32")


def _quantise(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise e4m3 quantisation: float8 weight and float32 scale_inv per 128x128 block."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = np.zeros((rows, cols), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = np.float32(max(np.abs(blk).max(), 1e-6) / 448.0)
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).astype(q.dtype)
    return q, scale


def test_fp8_per_expert_checkpoint_dequantises_each_expert(fused, tmp_path):
    """Every expert and attention Linear stored in FP8 with its own scales: the model equals
    the one loaded from the dequantised values written out in float32."""
    _, folder = fused
    split = _split_experts(load_file(folder / "model.safetensors"))
    quantised, dequantised = {}, {}
    for key, t in split.items():
        if ("experts." in key or "self_attn" in key) and key.endswith("proj.weight"):
            q, s = _quantise(t)
            quantised[key], quantised[key + "_scale_inv"] = q, s
            deq = (
                q.astype(np.float32)
                * np.repeat(np.repeat(s, 128, 0), 128, 1)[: t.shape[0], : t.shape[1]]
            )
            dequantised[key] = deq.astype(np.float32)
        else:
            quantised[key] = dequantised[key] = t
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    fp8 = _copy_with(folder, tmp_path / "fp8", quantised, {"quantization_config": quant})
    plain = _copy_with(folder, tmp_path / "plain", dequantised)
    a = params_as_numpy(qj.from_pretrained(fp8, dtype="float32"))
    b = params_as_numpy(qj.from_pretrained(plain, dtype="float32"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    gu = a["language_model.layers.0.mlp.gate_up_proj"]
    assert not np.array_equal(
        gu,
        params_as_numpy(qj.from_pretrained(folder, dtype="float32"))[
            "language_model.layers.0.mlp.gate_up_proj"
        ],
    )  # quantisation did change the values
