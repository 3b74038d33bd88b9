"""The checkpoint tables: every layout kind's export is the exact inverse of its import, and each
family's table names exactly the model's parameters, both ways."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading import orbax_io
from qwenvl_jax.loading.mapping import (
    EXPERTS,
    SAME,
    SPLIT,
    SPLIT_T,
    LayoutError,
    T,
    conv,
    mapping_for,
)
from qwenvl_jax.modeling import build_model

RNG = np.random.default_rng(0)

# (kind, hub tensor shape, our parameter shapes)
KINDS = [
    (SAME, (6, 5), [(6, 5)]),
    (T, (6, 5), [(5, 6)]),
    (SPLIT, (12,), [(4,), (4,), (4,)]),
    (SPLIT_T, (12, 5), [(5, 4), (5, 4), (5, 4)]),
    (conv((3, 2, 4, 4)), (8, 3, 2, 4, 4), [(96, 8)]),  # Conv3d patch embedding
    (conv((1, 4)), (10, 1, 4), [(4, 10)]),  # depthwise Conv1d of Gated DeltaNet
    (conv((3, 4, 4)), (8, 3, 4, 4), [(48, 8)]),  # v1's Conv2d
    (EXPERTS, (4, 6, 10), [(4, 6, 10)]),
]


@pytest.mark.parametrize("kind, hub, ours", KINDS, ids=[f"{k.name}-{len(h)}d" for k, h, _ in KINDS])
def test_export_is_the_exact_inverse_of_import(kind, hub, ours):
    a = RNG.standard_normal(hub).astype(np.float32)
    parts = kind.to_ours(a, ours)
    assert [p.shape for p in parts] == ours
    back = kind.to_hub(parts)
    assert back.shape == a.shape and back.tobytes() == a.tobytes()
    # and the other way: parameters -> checkpoint tensor -> the same parameters
    params = [RNG.standard_normal(s).astype(np.float32) for s in ours]
    again = kind.to_ours(kind.to_hub(params), ours)
    assert all(p.tobytes() == q.tobytes() for p, q in zip(params, again, strict=True))


def test_experts_stored_the_other_way_round_are_turned_to_fit():
    a = RNG.standard_normal((4, 10, 6)).astype(np.float32)
    (ours,) = EXPERTS.to_ours(a, [(4, 6, 10)])
    np.testing.assert_array_equal(ours, np.swapaxes(a, 1, 2))
    # export writes the hub layout, ours
    np.testing.assert_array_equal(EXPERTS.to_hub([ours]), ours)


def test_conv_of_another_kernel_extent_is_refused():
    with pytest.raises(LayoutError, match=r"conv weight \[out, 1, 4\]"):
        conv((1, 4)).to_ours(np.zeros((10, 4, 1)), [(4, 10)])


TINY = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_qwen3_vl_moe"]
TINY += ["tiny_qwen3_5", "tiny_qwen3_5_moe"]


@pytest.fixture(scope="module", params=TINY)
def family(request):
    config = load_config(request.param)
    shapes = {
        p: tuple(s.shape)
        for p, s in orbax_io.flat_params(build_model(config, abstract=True)).items()
    }
    return config, shapes


def test_table_round_trips_every_parameter(family):
    config, shapes = family
    mapping = mapping_for(config)
    params = {p: RNG.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
    exported = list(mapping.export_tensors(params))
    assert len(exported) == len(params)
    assert len({k for k, _ in exported}) == len(exported)
    back = {}
    for key, a in exported:
        for path, part in mapping.import_tensor(key, np.ascontiguousarray(a), shapes.get):
            back[path] = part
    assert back.keys() == params.keys()
    assert all(back[p].tobytes() == params[p].tobytes() for p in params)


def test_hub_names_and_layouts(family):
    config, shapes = family
    mapping = mapping_for(config)
    ghosts = {p: np.zeros(s, np.float32) for p, s in shapes.items()}
    hub = {k: a.shape for k, a in mapping.export_tensors(ghosts)}
    v = config.vision
    legacy = config.family in ("qwen2_vl", "qwen2_5_vl")
    visual = "visual" if legacy else "model.visual"
    text = "model" if legacy else "model.language_model"
    assert hub[f"{visual}.patch_embed.proj.weight"] == (
        v.hidden_size,
        v.in_channels,
        v.temporal_patch_size,
        v.patch_size,
        v.patch_size,
    )
    assert hub[f"{text}.embed_tokens.weight"] == shapes["language_model.embed_tokens.embedding"]
    t = config.text
    for i in range(t.num_hidden_layers):
        if t.layer_type(i) == "linear_attention":
            channels = 2 * t.linear_num_key_heads * t.linear_key_head_dim
            channels += t.linear_num_value_heads * t.linear_value_head_dim
            key = f"{text}.layers.{i}.linear_attn.conv1d.weight"
            assert hub[key] == (channels, 1, t.linear_conv_kernel_dim)
        if t.is_moe_layer(i):
            key = f"{text}.layers.{i}.mlp.experts.gate_up_proj"
            assert hub[key] == (t.num_experts, t.hidden_size, 2 * t.moe_intermediate_size)


def test_unknown_keys_and_parameters_are_one_line_errors(family):
    config, shapes = family
    mapping = mapping_for(config)
    with pytest.raises(CheckpointError, match=r"'model\.visual\.extra\.weight' maps to no"):
        mapping.import_tensor("model.visual.extra.weight", np.zeros(2), shapes.get)
    with pytest.raises(CheckpointError, match=r"parameter visual\.extra\.kernel has no checkpoint"):
        list(mapping.export_tensors({"visual.extra.kernel": np.zeros(2)}))
    key = "model.visual.patch_embed.proj.weight"
    with pytest.raises(
        CheckpointError, match=r"patch_embed\.proj\.weight' of shape \(3, 5\) is not"
    ):
        mapping.import_tensor(key, np.zeros((3, 5)), shapes.get)
    # one parameter alone gives its key (the loader names a missing tensor so)
    ((name, _),) = mapping.export_tensors({"language_model.norm.weight": np.zeros(3)})
    assert name.endswith("norm.weight") and "layers" not in name
