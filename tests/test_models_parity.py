"""Logits of the four modern families equal transformers' on tiny random models (float32, 1e-4).

Each model is saved with `save_pretrained` and loaded back through `qj.from_pretrained`, so the
checkpoint reader and the key mapping (legacy names for Qwen2/2.5, MoE expert layouts) are part of
what is checked.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hf_models import FAMILIES, build_inputs, hf_logits, hf_model, rel_err

import qwenvl_jax as qj

TOL = 1e-4

CASES = {
    "one_image": [{"text": list(range(10, 24)), "images": [(4, 6)]}],
    "two_images": [{"text": list(range(30, 41)), "images": [(6, 4), (8, 8)]}],
    # grid_t=2 temporal patches (4 frames) of 2x3 merged tokens: the text after the video starts
    # at the same position under the legacy rule and transformers 5's rule (test_mrope.py has
    # the case where they differ).
    "video": [{"text": list(range(10, 20)), "videos": [(2, 4, 6)]}],
    "padded_batch": [
        {"text": list(range(10, 30)), "images": [(4, 4)]},
        {"text": list(range(40, 47)), "images": [(6, 8)]},
    ],
    "text_only_batch": [{"text": list(range(5, 30))}, {"text": list(range(50, 60))}],
}


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    ref = hf_model(family)
    folder = tmp_path_factory.mktemp(family)
    ref.save_pretrained(folder)
    ours = qj.from_pretrained(folder, dtype="float32")
    return family, ref, ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    family, ref, ours = pair
    inputs = build_inputs(family, CASES[case], seed=zlib.crc32(case.encode()) % 1000)
    if family == "qwen2_5_vl" and "video_grid_thw" in inputs:
        inputs["second_per_grid_ts"] = [1.0]
    expected = hf_logits(ref, inputs)
    got = np.asarray(ours(**inputs))
    assert got.shape == expected.shape
    assert rel_err(got, expected, inputs["attention_mask"]) < TOL


def test_qwen2_5_window_padding(tmp_path):
    """Merged grids whose sides are not multiples of the 4-token window (and one that is, where
    the reference still pads a whole window) go through the window permutation and back."""
    ref = hf_model("qwen2_5_vl", seed=3)
    ref.save_pretrained(tmp_path)
    ours = qj.from_pretrained(tmp_path, dtype="float32")
    prompts = [{"text": list(range(10, 16)), "images": [(10, 14), (8, 8), (2, 18)]}]
    inputs = build_inputs("qwen2_5_vl", prompts, seed=5)
    expected = hf_logits(ref, inputs)
    assert rel_err(np.asarray(ours(**inputs)), expected, inputs["attention_mask"]) < TOL


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_tied_embeddings(family, tmp_path):
    ref = hf_model(family, tie=True)
    ref.save_pretrained(tmp_path)
    ours = qj.from_pretrained(tmp_path, dtype="float32")
    assert ours.lm_head is None
    inputs = build_inputs(family, CASES["one_image"])
    expected = hf_logits(ref, inputs)
    assert rel_err(np.asarray(ours(**inputs)), expected, inputs["attention_mask"]) < TOL


def test_qwen3_deepstack_changes_logits(tmp_path):
    """DeepStack is really applied: zeroing the DeepStack mergers' output layer moves the logits
    at and after the image (and the model still matches transformers with them in place)."""
    ref = hf_model("qwen3_vl", deepstack=(0, 1))
    ref.save_pretrained(tmp_path)
    ours = qj.from_pretrained(tmp_path, dtype="float32")
    inputs = build_inputs("qwen3_vl", CASES["one_image"])
    base = np.asarray(ours(**inputs))
    assert rel_err(base, hf_logits(ref, inputs), inputs["attention_mask"]) < TOL
    for merger in ours.visual.deepstack_merger_list:
        merger.fc2.kernel[...] = merger.fc2.kernel[...] * 0
        merger.fc2.bias[...] = merger.fc2.bias[...] * 0
    assert np.abs(np.asarray(ours(**inputs)) - base).max() > 1e-3


def test_unmapped_key_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = hf_model("qwen2_vl")
    ref.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    tensors["visual.blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(qj.CheckpointError, match="visual.blocks.0.attn.extra.weight"):
        qj.from_pretrained(tmp_path, dtype="float32")


def test_missing_tensor_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = hf_model("qwen3_vl")
    ref.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.language_model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(qj.CheckpointError, match="q_norm"):
        qj.from_pretrained(tmp_path, dtype="float32")
