"""M-RoPE positions and RoPE layouts against the notes' worked examples, and bfloat16 numerics
against the reference's own bfloat16 error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import FAMILIES, build_inputs, hf_logits, hf_model

import qwenvl_jax as qj
from qwenvl_jax.config import from_hf
from qwenvl_jax.layers.rope import mrope_axes
from qwenvl_jax.models.mrope import get_rope_index


def test_mrope_layouts():
    assert "".join("THW"[a] for a in mrope_axes((4, 6, 6), False)) == "TTTTHHHHHHWWWWWW"
    assert "".join("THW"[a] for a in mrope_axes((6, 5, 5), True)) == "THWTHWTHWTHWTHWT"
    real = "".join("THW"[a] for a in mrope_axes((24, 20, 20), True))
    assert real == "THW" * 20 + "TTTT"


def _config(family):
    from hf_models import hf_config

    return from_hf(hf_config(family).to_dict())


def test_legacy_rule_for_text_after_video():
    """QWEN2_3_VL.md section 4: T'=4 merged frames of 2x3 tokens, second_per_grid_t 2 with 2
    tokens per second (interval 4): t runs 0, 4, 8, 12, so the text after the video starts at 13
    past the video's start under the released checkpoints' rule (transformers 5 would say 3)."""
    cfg = _config("qwen2_5_vl")
    vs, ve, vid = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    ids = np.array([[1, vs] + [vid] * 24 + [ve, 2, 3]])
    pos, delta = get_rope_index(
        cfg, ids, video_grid_thw=np.array([[4, 4, 6]]), second_per_grid_ts=np.array([2.0])
    )
    start = 2
    video = pos[:, 0, 2:26]
    assert sorted(set(video[0].tolist())) == [start + 0, start + 4, start + 8, start + 12]
    assert video[1].max() == start + 1 and video[2].max() == start + 2
    assert pos[0, 0, 26] == start + 13  # vision_end: legacy max+1 = 16 in the notes' origin
    assert pos[:, 0, 28].tolist() == [start + 15] * 3
    assert delta[0] == pos.max() + 1 - ids.shape[1]


def test_positions_skip_padding_and_count_items():
    cfg = _config("qwen2_vl")
    img = cfg.image_token_id
    ids = np.array([[0, 0, 5, img, img, img, img, 6], [5, 6, 7, 8, 9, 10, 11, 12]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    pos, delta = get_rope_index(cfg, ids, mask, image_grid_thw=np.array([[1, 4, 4]]))
    assert pos[:, 0, :2].tolist() == [[1, 1]] * 3  # padding
    assert pos[:, 0, 2].tolist() == [0, 0, 0]
    assert pos[0, 0, 3:7].tolist() == [1, 1, 1, 1]
    assert pos[1, 0, 3:7].tolist() == [1, 1, 2, 2] and pos[2, 0, 3:7].tolist() == [1, 2, 1, 2]
    assert pos[:, 0, 7].tolist() == [3, 3, 3]
    assert pos[:, 1].tolist() == [list(range(8))] * 3
    assert delta.tolist() == [4 - 8, 0]
    with pytest.raises(ValueError, match="fewer image tokens"):
        get_rope_index(cfg, ids, mask, image_grid_thw=np.array([[1, 4, 4], [1, 2, 2]]))


# Qwen3.5-MoE is left out: its tiny model's ratio of bf16 errors (ours / the reference's) varies
# with the seed far more than the 10% slack (seed 0: 1.19; seeds 1, 2, 3: 0.94, 1.03, 0.26), as
# top-k routing under bf16 would make it; the check needs a routing-insensitive form first.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3_5_moe"])
def test_bfloat16_error_within_reference_bfloat16_error(family, tmp_path):
    """Our bf16-vs-fp32 logit difference is no larger than transformers' own (mean over the valid
    positions; both are rounding noise, so 10% slack separates a real precision bug, which costs
    several times more, from sampling noise)."""
    ref = hf_model(family)
    ref.save_pretrained(tmp_path)
    prompts = [
        {"text": list(range(10, 30)), "images": [(4, 4)]},
        {"text": list(range(40, 47)), "images": [(6, 8)]},
    ]
    inputs = build_inputs(family, prompts)
    valid = inputs["attention_mask"].astype(bool)
    ref32 = hf_logits(ref, inputs)
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref16 = ref.to(torch.bfloat16)(**kw).logits.float().numpy()
    ours32 = np.asarray(qj.from_pretrained(tmp_path, dtype="float32")(**inputs))
    model16 = qj.from_pretrained(tmp_path, dtype="bfloat16")
    assert set(np.dtype(v.dtype) for v in qj.modeling.params_as_numpy(model16).values()) == {
        np.dtype("bfloat16")
    }
    ours16 = np.asarray(model16(**inputs))
    assert ours16.dtype == np.dtype("bfloat16")
    ours_err = np.abs(ours16.astype(np.float32) - ours32)[valid].mean()
    ref_err = np.abs(ref16 - ref32)[valid].mean()
    assert 0 < ours_err <= 1.1 * ref_err


def test_moe_layer_selection():
    """decoder_sparse_step and mlp_only_layers pick the MoE layers as transformers does:
    (i + 1) % step == 0 and i not in mlp_only_layers."""
    from hf_models import hf_config

    from qwenvl_jax.layers.mlp import GatedMLP
    from qwenvl_jax.layers.moe import SparseMoE

    hf = hf_config("qwen3_vl_moe").to_dict()
    hf["text_config"].update(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    model = qj.build_model(from_hf(hf), abstract=True)
    from qwenvl_jax.models.text import layer_runs

    runs = zip(layer_runs(model.config.text), model.language_model.runs)
    kind = {i: type(run.mlp) for layers, run in runs for i in layers}  # stacked runs
    kinds = [kind[i] for i in range(6)]
    assert kinds == [GatedMLP, SparseMoE, GatedMLP, GatedMLP, GatedMLP, SparseMoE]
