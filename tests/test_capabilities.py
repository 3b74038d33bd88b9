"""Family differences as named capabilities (qwenvl_jax.config.Capabilities and the VisionConfig
tower flags): every family has them, each preset gets its family's, the tower flags follow the
config fields, and a config whose parts contradict its family fails where it is built."""

from __future__ import annotations

import dataclasses

import pytest

from qwenvl_jax.config import (
    CAPABILITIES,
    FAMILIES,
    ModelConfig,
    V1VisionConfig,
    capabilities,
    load_config,
    presets,
)
from qwenvl_jax.errors import ConfigError


def test_every_family_has_a_row():
    assert set(CAPABILITIES) == set(FAMILIES)
    with pytest.raises(ConfigError, match="unknown model family 'llava'"):
        capabilities("llava")


def test_family_rows():
    got = {
        f: (c.fixed_size_images, c.video_time, c.video_sampling, c.box_format, c.processor)
        for f, c in CAPABILITIES.items()
    }
    assert got == {
        "qwen_vl": (True, "none", None, "ref_tags", None),
        "qwen2_vl": (False, "index", "qwen2", "ref_tokens", None),
        "qwen2_5_vl": (False, "seconds", "qwen2", "json_input_pixels", None),
        "qwen3_vl": (False, "timestamps", "qwen3", "json_relative", None),
        "qwen3_vl_moe": (False, "timestamps", "qwen3", "json_relative", None),
        "qwen3_5": (False, "timestamps", "qwen3", None, "qwen3_vl"),
        "qwen3_5_moe": (False, "timestamps", "qwen3", None, "qwen3_vl"),
    }


@pytest.mark.parametrize("name", presets())
def test_presets_tower_flags(name):
    config = load_config(name)
    assert config.capabilities is CAPABILITIES[config.family]
    v = config.vision
    if isinstance(v, V1VisionConfig):
        return
    # only Qwen2.5-VL's tower has windows, RMSNorm and a SwiGLU MLP; only Qwen3-VL's a patch bias
    assert v.window_attention == (config.family == "qwen2_5_vl") == v.gated_mlp
    assert v.norm == ("rmsnorm" if config.family == "qwen2_5_vl" else "layernorm")
    assert v.patch_bias == config.family.startswith("qwen3")


def test_window_attention_follows_window_size():
    v = load_config("tiny_qwen2_5_vl").vision
    assert not dataclasses.replace(v, window_size=0).window_attention
    assert dataclasses.replace(
        load_config("tiny_qwen3_vl").vision, window_size=112
    ).window_attention


def test_contradictions_fail_where_built():
    config = load_config("tiny_qwen2_vl")
    with pytest.raises(ConfigError, match="unknown vision kind 'qwen9_vl'"):
        dataclasses.replace(config.vision, kind="qwen9_vl")
    with pytest.raises(ConfigError, match="a qwen_vl model needs a V1VisionConfig"):
        config.replace(family="qwen_vl")
    v1 = load_config("tiny_qwen_vl")
    with pytest.raises(ConfigError, match="a qwen2_vl model needs a VisionConfig"):
        v1.replace(family="qwen2_vl")
    d = config.to_dict()
    d["family"] = "qwen9_vl"
    with pytest.raises(ConfigError, match="unknown model family 'qwen9_vl'"):
        ModelConfig.from_dict(d)
