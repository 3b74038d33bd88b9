"""The training run config, the stage configs' freeze tables and the optimiser pieces: everything
of `train` that needs no compiled step (the metrics log is tests/test_train_metrics.py)."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from qwenvl_jax.cli import main
from qwenvl_jax.config import FAMILIES, load_config
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.modeling import build_model
from qwenvl_jax.train.config import (
    from_dict,
    load_train_config,
    parse_overrides,
    read_file,
    stage_config_path,
)
from qwenvl_jax.train.freeze import param_paths, trainable_mask
from qwenvl_jax.train.optim import decay_mask, learning_rate_schedule, lr_factors, make_optimizer


def test_overrides_are_dotted_and_typed():
    over = parse_overrides(
        [
            "steps=7",
            "learning_rate=1e-4",
            "mesh.fsdp=2",
            "data.train=x.jsonl",
            "scan_layers=true",
            "model=tiny_qwen2_vl",
        ]
    )
    assert over == {
        "steps": 7,
        "learning_rate": "1e-4",
        "mesh": {"fsdp": 2},
        "data": {"train": "x.jsonl"},
        "scan_layers": True,
        "model": "tiny_qwen2_vl",
    }
    cfg = from_dict(over)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.mesh.fsdp == 2 and cfg.mesh.data == -1
    assert cfg.scan_layers is True and cfg.steps == 7


@pytest.mark.parametrize(
    "bad, message",
    [
        (["steps"], "expected KEY=VALUE"),
        (["stepz=3"], "unknown training config key 'stepz'"),
        (["steps=ten"], "steps: expected int"),
        (["steps=0"], "steps must be > 0"),
        (["stage=4"], "stage must be 1, 2 or 3"),
        (["remat=sometimes"], "remat must be one of"),
        (["mesh.pods=2"], "unknown mesh axis 'pods'"),
        (["freeze=[['(', 'train']]"], "bad regex"),
        (["freeze=[['.*', 'thaw']]"], "must be train or freeze"),
        (["lr_scale=[['visual.*', 0]]"], "lr_scale: factor of 'visual.*' must be > 0"),
        (["lr_scale=[['visual.*', 'slow']]"], "lr_scale: factor of 'visual.*' must be a number"),
        (["lr_scale=[['(', 0.1]]"], "lr_scale: bad regex"),
        (["lr_scale=[['visual.*']]"], "lr_scale: bad row"),
    ],
)
def test_bad_settings_fail_in_one_line(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        load_train_config(None, ["model=tiny_qwen2_vl", *bad])
    assert "\n" not in str(e.value)


def test_stage_config_picked_by_model_and_stage_and_overridden():
    cfg = load_train_config(None, ["model=tiny_qwen3_vl", "stage=3", "learning_rate=0.5"])
    assert cfg.stage == 3 and cfg.learning_rate == 0.5
    assert cfg.freeze == tuple(
        tuple(r) for r in read_file(stage_config_path("qwen3_vl", 3))["freeze"]
    )
    assert cfg.data["loss_on"] == "assistant"


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not a valid config file"):
        load_train_config(bad, [])
    with pytest.raises(ConfigError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="needs --config FILE, or model="):
        load_train_config(None, [])


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["train", "--workdir", str(tmp_path), "model=tiny_qwen2_vl", "stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown training config key 'stepz'" in err
    assert main(["train", "--workdir", str(tmp_path), "model=tiny_qwen2_vl"]) == 2
    assert "data.train is not set" in capsys.readouterr().err


def _tiny_paths(family: str) -> list[str]:
    return param_paths(build_model(load_config(f"tiny_{family}"), abstract=True))


def _is_adapter(family: str, path: str) -> bool:
    if family == "qwen_vl":  # the resampler, ln_post and proj
        return path.startswith(("visual.attn_pool.", "visual.ln_post.")) or path == "visual.proj"
    return path.startswith("visual.") and "merger" in path


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_tables_freeze_the_right_parts(family):
    paths = _tiny_paths(family)
    masks = {
        s: trainable_mask(paths, read_file(stage_config_path(family, s))["freeze"])
        for s in (1, 2, 3)
    }
    fixed = "visual.attn_pool.pos_embed"  # Qwen-VL v1's sin-cos table never trains
    paths = [p for p in paths if p != fixed]
    vit = [p for p in paths if p.startswith("visual.") and not _is_adapter(family, p)]
    adapter = [p for p in paths if _is_adapter(family, p)]
    llm = [p for p in paths if not p.startswith("visual.")]
    assert vit and adapter and llm
    # stage 1: ViT + adapter train, LLM frozen; stage 2: everything; stage 3: ViT frozen
    assert all(masks[1][p] for p in vit + adapter) and not any(masks[1][p] for p in llm)
    assert all(masks[2][p] for p in paths)
    assert not any(masks[3][p] for p in vit) and all(masks[3][p] for p in adapter + llm)
    if family == "qwen_vl":
        assert not any(masks[s][fixed] for s in (1, 2, 3))


def test_freeze_table_must_be_complete_and_used():
    paths = ["visual.a.kernel", "language_model.b.kernel"]
    with pytest.raises(ConfigError, match="no row matches parameter language_model.b.kernel"):
        trainable_mask(paths, [(r"visual\..*", "train")])
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_mask(paths, [(r"vision\..*", "train"), (".*", "freeze")])
    assert trainable_mask(paths, [(r"visual\..*", "freeze"), (".*", "train")]) == {
        "visual.a.kernel": False,
        "language_model.b.kernel": True,
    }


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = from_dict(
        {"learning_rate": 1e-3, "warmup_steps": 10, "steps": 110, "end_learning_rate_ratio": 0.1}
    )
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert math.isclose(float(lr(5)), 5e-4, rel_tol=1e-6)
    assert math.isclose(float(lr(10)), 1e-3, rel_tol=1e-6)
    assert math.isclose(float(lr(60)), 1e-4 + 0.5 * (1e-3 - 1e-4), rel_tol=1e-5)  # cosine midpoint
    assert math.isclose(float(lr(110)), 1e-4, rel_tol=1e-5)
    values = [float(lr(s)) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_norms_and_biases():
    model = build_model(load_config("tiny_qwen2_vl"), abstract=True)
    state = nnx.state(model, nnx.Param)
    mask = {
        ".".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(decay_mask(state, (r".*embed_tokens.*",)))
    }
    assert mask["language_model.runs.0.self_attn.q_proj.kernel"]
    assert mask["visual.runs.0.mlp.fc1.kernel"]
    # stacked decoder layers and ViT blocks: [layers, ...]; a bias or norm scale is 1-D per layer
    assert not mask["language_model.runs.0.self_attn.q_proj.bias"]
    assert not mask["language_model.runs.0.input_layernorm.weight"]
    assert not mask["visual.runs.0.norm1.weight"]
    assert not mask["visual.merger.norm.bias"]
    assert not mask["language_model.embed_tokens.embedding"]  # by the no_decay regex
    # and AdamW applies it so: a zero gradient moves only the decayed leaves
    params = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    tx = optax.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    assert np.all(updates["w"] < 0) and np.all(updates["b"] == 0)


def test_lr_scale_multiplies_the_update_of_matching_parameters():
    """AdamW's first update is -lr * (sign(g) + wd * p) per entry: a row's factor scales the whole
    of it for the parameters it matches first, and leaves the others as they are."""
    state = nnx.state(build_model(load_config("tiny_qwen_vl"), seed=0), nnx.Param)
    table = [[r"visual\.attn_pool\..*", 1.0], [r"visual\..*", 0.25]]
    base = {
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "steps": 10,
        "weight_decay": 0.1,
        "clip_norm": 0.0,
    }
    plain = make_optimizer(from_dict(base), state)
    scaled = make_optimizer(from_dict({**base, "lr_scale": table}), state)
    grads = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), state)
    flat = {}
    for name, tx in (("plain", plain), ("scaled", scaled)):
        updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
        flat[name] = {
            ".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(updates)
        }
    checked = set()
    for path, u in flat["plain"].items():
        if path.startswith("visual.attn_pool.") or not path.startswith("visual."):
            want = 1.0
        else:
            want = 0.25
        np.testing.assert_allclose(flat["scaled"][path], want * u, rtol=1e-6, err_msg=path)
        assert np.any(u != 0), path
        checked.add(want)
    assert checked == {1.0, 0.25}
    with pytest.raises(ConfigError, match="lr_scale: regex 'vision.*' matches no trainable"):
        lr_factors(state, (("vision.*", 0.1),))


@pytest.mark.parametrize(
    "devices, batch, experts, expected",
    [
        (1, 4, 0, (1, 1, 1, 1)),
        (8, 16, 0, (1, 8, 1, 1)),  # Qwen2.5-VL-7B on v5p:2x2x2: FSDP over every chip
        (8, 4, 0, (1, 4, 2, 1)),  # fewer rows than chips: tensor parallelism for the rest
        (32, 32, 128, (1, 4, 1, 8)),  # Qwen3-VL-30B-A3B on v5p:2x4x4
        (128, 128, 128, (1, 16, 1, 8)),  # Qwen3-VL-235B-A22B on v5p:4x4x8
        (8, 6, 16, (1, 1, 4, 2)),  # 6 rows: 2 on the expert axis, 3 rows each, tensor 4
    ],
)
def test_mesh_auto_chooses_fsdp_experts_then_tensor(devices, batch, experts, expected):
    from qwenvl_jax.train.config import resolve_mesh

    cfg = from_dict({"mesh": "auto"})
    assert cfg.mesh.auto
    m = resolve_mesh(cfg.mesh, devices, batch, experts)
    assert (m.data, m.fsdp, m.tensor, m.expert) == expected and not m.auto
    assert m.data * m.fsdp * m.tensor * m.expert == devices
    assert batch % (m.data * m.fsdp * m.expert) == 0
    explicit = from_dict({"mesh": {"fsdp": 2}}).mesh
    assert resolve_mesh(explicit, devices, batch, experts) == explicit  # a given mesh wins
