"""Qwen3.5 and Qwen3.5-MoE against transformers 5.23.0 on tiny random models: logits (float32,
1e-4 relative) for text, images, video and a left-padded batch, with prompts longer than one
64-token chunk of the delta rule; greedy decoding with the cache against `generate()`; HF -> Orbax
-> HF bit for bit with the multi-token-prediction weights; FP8 block-scaled checkpoints; the
parameter counts of the released configs.

The tiny models (tests/hf_models.py) mix the layer types in a pattern other than every fourth
layer, give the linear layers more value heads than key heads, and rotate a quarter of each head.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import QWEN3_5_LAYERS, build_inputs, hf_logits, hf_model, rel_err
from safetensors.numpy import load_file, save_file

import qwenvl_jax as qj
from qwenvl_jax.inference.generate import decode_logits, prefill_logits
from qwenvl_jax.loading import convert
from qwenvl_jax.loading.reader import open_checkpoint
from qwenvl_jax.models.mtp import CarriedParam
from qwenvl_jax.models.text import layer_groups, layer_runs

TOL = 1e-4
FAMILIES = ("qwen3_5", "qwen3_5_moe")
REFERENCE = Path("/work/shared/reference_configs")
NEW_TOKENS = 32

TEXT = list(range(10, 110))  # 100 text tokens: two chunks of the delta rule
CASES = {
    "text_only": [{"text": TEXT}],
    "one_image": [{"text": list(range(10, 70)), "images": [(4, 6)]}],
    "two_images": [{"text": list(range(30, 41)), "images": [(6, 4), (8, 8)]}],
    "video": [{"text": list(range(10, 80)), "videos": [(2, 4, 6)]}],
    "padded_batch": [
        {"text": list(range(10, 90)), "images": [(4, 4)]},
        {"text": list(range(40, 47)), "images": [(6, 8)]},
        {"text": list(range(100, 130))},
    ],
}


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    ref = hf_model(family)
    folder = tmp_path_factory.mktemp(family)
    ref.save_pretrained(folder)
    return family, ref, qj.from_pretrained(folder, dtype="float32")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    family, ref, ours = pair
    inputs = build_inputs(family, CASES[case], seed=zlib.crc32(case.encode()) % 1000)
    if case != "two_images":
        assert inputs["input_ids"].shape[1] > 64  # crosses a chunk boundary of the delta rule
    expected = hf_logits(ref, inputs)
    got = np.asarray(ours(**inputs))
    assert got.shape == expected.shape
    assert rel_err(got, expected, inputs["attention_mask"]) < TOL


def test_hybrid_layers_are_stacked_in_runs(pair):
    """Layers are stacked in runs, scanned in groups of a repeating pattern (here linear, full
    once, then linear twice, then full: three scans); the linear layers hold a Gated DeltaNet,
    the others gated attention (q_proj twice as wide: query and gate)."""
    family, ref, ours = pair
    cfg = ours.config.text
    assert cfg.layer_types == tuple(QWEN3_5_LAYERS)
    assert layer_groups(cfg) == ((0, 2, 1), (2, 1, 2), (4, 1, 1))
    assert layer_runs(cfg) == [range(0, 1), range(1, 2), range(2, 4), range(4, 5)]
    runs = ours.language_model.runs
    assert runs[2].linear_attn.A_log.shape == (2, cfg.linear_num_value_heads)
    assert runs[1].self_attn.q_proj.kernel.shape == (1, 64, 2 * 4 * 32)
    assert not hasattr(runs[1], "linear_attn") and not hasattr(runs[0], "self_attn")
    assert (family == "qwen3_5_moe") == hasattr(runs[0].mlp, "shared_expert_gate")
    assert ours.mtp is None  # save_pretrained drops the mtp weights: the model has none


@nnx.jit(static_argnames="cache_len")
def _prefill(model, ids, seg, pos, vision, cache_len):
    return prefill_logits(model, ids, seg, pos, vision, cache_len=cache_len)


@nnx.jit
def _decode(model, cache, tokens, positions, slot):
    return decode_logits(model, cache, tokens, positions, slot)


def greedy(model, inputs: dict, new_tokens: int) -> np.ndarray:
    """Greedy decoding through the cache: one prefill, then one token per step."""
    x = model.prepare(**inputs)
    P = x.input_ids.shape[1]
    logits, cache = _prefill(
        model, x.input_ids, x.segment_ids, x.position_ids, x.vision, cache_len=P + new_tokens
    )
    tokens = np.argmax(np.asarray(logits), axis=-1)
    out = [tokens]
    for step in range(new_tokens - 1):
        logits, cache = _decode(
            model, cache, tokens.astype(np.int32), x.next_position + step, np.int32(P + step)
        )
        tokens = np.argmax(np.asarray(logits), axis=-1)
        out.append(tokens)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("case", ["one_image", "padded_batch"])
def test_greedy_decoding_matches_hf_generate(pair, case):
    family, ref, ours = pair
    inputs = build_inputs(family, CASES[case], seed=3)
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = ref.generate(
            **kw,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = out[:, inputs["input_ids"].shape[1] :].numpy()
    assert expected.shape == (len(CASES[case]), NEW_TOKENS)
    assert len(np.unique(expected)) > NEW_TOKENS // 2  # not a degenerate repetition
    np.testing.assert_array_equal(greedy(ours, inputs, NEW_TOKENS), expected)


# ----------------------------------------------------------------------------- checkpoints


def with_mtp(src: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Add `mtp.*` tensors as the released checkpoints carry them (fc, three norms, one
    full-attention layer shaped as layer 1, experts one by one) to a save_pretrained folder."""
    path = src / "model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(seed)
    D = tensors["model.language_model.norm.weight"].shape[0]
    mtp = {
        "mtp.fc.weight": (D, 2 * D),
        "mtp.norm.weight": (D,),
        "mtp.pre_fc_norm_embedding.weight": (D,),
        "mtp.pre_fc_norm_hidden.weight": (D,),
    }
    layer = "model.language_model.layers.1."
    for key, a in tensors.items():
        if key.startswith(layer):
            mtp["mtp.layers.0." + key[len(layer) :]] = a.shape
    added = {k: rng.standard_normal(s).astype(np.float32) for k, s in mtp.items()}
    save_file({**tensors, **added}, path, metadata={"format": "pt"})
    return added


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(folder) as reader:
        return dict(reader.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_keeps_mtp_weights_bit_identical(tmp_path, family):
    ref = hf_model(family, seed=1)
    src = tmp_path / "hf"
    ref.save_pretrained(src)
    added = with_mtp(src)
    if family == "qwen3_5_moe":
        assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in added
        assert "mtp.layers.0.mlp.shared_expert_gate.weight" in added
    convert.hf_to_orbax(src, tmp_path / "orbax", "float32", progress=False)
    convert.orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    before, after = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for key, a in before.items():
        assert after[key].dtype == a.dtype and after[key].tobytes() == a.tobytes(), key

    # loaded from either folder, the mtp weights are kept but neither counted nor run
    for folder in (src, tmp_path / "orbax"):
        model = qj.from_pretrained(folder, dtype="float32")
        assert model.mtp is not None
        fc = model.mtp.fc.kernel
        assert isinstance(fc, CarriedParam)
        np.testing.assert_array_equal(np.asarray(fc[...]), added["mtp.fc.weight"].T)
        assert qj.param_count(model) == sum(p.numel() for p in ref.parameters())
        inputs = build_inputs(family, CASES["one_image"], seed=7)
        got = np.asarray(model(**inputs))
        assert rel_err(got, hf_logits(ref, inputs), inputs["attention_mask"]) < TOL


def _quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32[R, C] -> (float8_e4m3fn[R, C], float32 scale_inv[ceil(R/b0), ceil(C/b1)])."""
    (b0, b1), (rows, cols) = block, w.shape
    scale = torch.empty(-(-rows // b0), -(-cols // b1))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / scale[i, j]).to(q.dtype)
    return q, scale


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_checkpoint_is_dequantised(tmp_path, family):
    """The 2-D projection weights (attention, Gated DeltaNet, experts one by one, mtp) stored as
    FP8 with one scale per 32 x 32 block load as float32(W) * scale, as transformers'
    dequantisation gives them."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    block = (32, 32)
    src = tmp_path / "hf"
    hf_model(family, seed=2).save_pretrained(src)
    with_mtp(src, seed=2)
    tensors, dequantised = {}, {}
    for key, w in load_torch(src / "model.safetensors").items():
        if w.ndim == 2 and "proj" in key and "visual" not in key:
            q, s = _quantise(w, block)
            tensors[key], tensors[key + "_scale_inv"] = q, s
            full = s.repeat_interleave(block[0], 0)[: w.shape[0]]
            dequantised[key] = q.float() * full.repeat_interleave(block[1], 1)[:, : w.shape[1]]
        else:
            tensors[key] = w
    save_torch(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (src / "config.json").write_text(json.dumps(config))

    model = qj.from_pretrained(src, dtype="float32")
    params = qj.modeling.params_as_numpy(model)
    key = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"
    path = "language_model.layers.0.linear_attn.in_proj_qkv.kernel"
    np.testing.assert_array_equal(params[path], dequantised[key].numpy().T)
    fc = np.asarray(model.mtp.layers[0].self_attn.q_proj.kernel[...])
    np.testing.assert_array_equal(fc, dequantised["mtp.layers.0.self_attn.q_proj.weight"].numpy().T)
    if family == "qwen3_5_moe":
        gate_up = params["language_model.layers.2.mlp.gate_up_proj"]  # [E, D, 2I]
        e3 = "model.language_model.layers.2.mlp.experts.3."
        I = gate_up.shape[-1] // 2
        np.testing.assert_array_equal(gate_up[3, :, :I], dequantised[e3 + "gate_proj.weight"].T)
        np.testing.assert_array_equal(gate_up[3, :, I:], dequantised[e3 + "up_proj.weight"].T)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in REFERENCE.glob("Qwen__Qwen3.5-*") if p.is_dir())
)
def test_parameter_counts_of_the_released_configs(name):
    expected = json.loads((REFERENCE / "params_qwen3_5.json").read_text())[name]
    model = qj.from_pretrained(REFERENCE / name, abstract=True)
    assert model.family == expected["model_type"]
    assert qj.param_count(model) == expected["total"]
    vision = sum(
        int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.visual, nnx.Param))
    )
    assert vision == expected["vision"]
    # the mtp weights the checkpoints carry are built too (not counted: transformers drops them)
    assert model.mtp is not None and len(model.mtp.layers) == 1
