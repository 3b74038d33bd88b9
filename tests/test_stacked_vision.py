"""The modern vision towers' blocks stacked by construction and scanned, one scan per group of a
repeating block pattern (window / full attention; groups end at the DeepStack taps): the same
logits, loss and gradients as running the blocks one by one (float32, 1e-5 relative) for
Qwen2-VL, Qwen2.5-VL (window and full blocks in a pattern of period 4) and Qwen3-VL (DeepStack);
a forward program whose loops and size do not grow with the depth; and checkpoints that keep
one entry per block."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx
from test_stacked_layers import _outputs, _rel, mesh

from qwenvl_jax.config import load_config
from qwenvl_jax.data.batch import batch_to_model_inputs
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading import orbax_io
from qwenvl_jax.modeling import build_model, from_pretrained, params_as_numpy
from qwenvl_jax.models.text import LayerGroup
from qwenvl_jax.models.vision import VisionTower, block_groups, block_runs
from qwenvl_jax.train.blocks import apply_remat
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.step import Trainer
from qwenvl_jax.train.synthetic import SyntheticBatches


def _tower(preset, depth, **vision):
    """A tiny preset with a deeper tower (`vision`: fullatt / DeepStack indexes)."""
    cfg = load_config(preset)
    v = dataclasses.replace(cfg.vision, depth=depth, **vision)
    return dataclasses.replace(cfg, vision=v)


def _qwen2_5(depth):
    """A window-attention pattern of period 4 (three window blocks, one full), windows of one
    merged token (2 x 2 patches), smaller than the synthetic images."""
    full = tuple(range(3, depth, 4))
    return _tower("tiny_qwen2_5_vl", depth, fullatt_block_indexes=full, window_size=28)


def _qwen3(depth):  # three DeepStack taps, as the released models have
    taps = (1, 3, 5) if depth == 8 else tuple(range(depth // 4 - 1, depth - 1, depth // 4))[:3]
    return _tower("tiny_qwen3_vl", depth, deepstack_visual_indexes=taps)


CONFIGS = {
    "qwen2_vl": lambda: _tower("tiny_qwen2_vl", 4),
    "qwen2_5_vl": lambda: _qwen2_5(8),
    "qwen3_vl": lambda: _tower("tiny_qwen3_vl", 5, deepstack_visual_indexes=(1, 3)),
}
GROUPS = {
    "qwen2_vl": ((0, 1, 4),),
    "qwen2_5_vl": ((0, 4, 2),),
    "qwen3_vl": ((0, 1, 2), (2, 1, 2), (4, 1, 1)),  # a group ends at each tap
}


def per_block_run(self, x, angles, segment_ids, window_segment_ids):
    """The reference: `VisionTower.run_blocks` as a Python loop over the blocks, each block a
    module of its own made of its slice of the stacked parameters (no scan)."""
    cfg = self.cfg
    blocks = {}
    for ids, run in zip(block_runs(cfg), self.runs, strict=True):
        graphdef, state = nnx.split(run)
        for j, i in enumerate(ids):
            blocks[i] = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
    assert sorted(blocks) == list(range(cfg.depth))
    taps = []
    for i in range(cfg.depth):
        full = cfg.is_full(i)
        assert blocks[i].attn.max_segment == (None if full else cfg.window_patches)
        x = blocks[i](x, angles, segment_ids if full else window_segment_ids)
        if i in cfg.deepstack_visual_indexes:
            taps.append((cfg.deepstack_visual_indexes.index(i), x))
    return x, taps


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scanned_blocks_equal_the_per_block_loop(name, monkeypatch):
    cfg = CONFIGS[name]()
    assert block_groups(cfg.vision) == GROUPS[name]
    base = build_model(cfg, mesh=mesh(), dtype="float32")
    graphdef, weights = nnx.split(base)
    host = jax.device_get(weights)
    batch = next(SyntheticBatches(cfg, 2, 64, seed=3))
    if cfg.vision.window_attention:  # windows smaller than the images: the two kinds differ
        assert not np.array_equal(batch["vision.segment_ids"], batch["vision.window_segment_ids"])
    # the scan with and without remat (Qwen2.5's period-4 body under "full"), and the loop
    modes = ("scan", "scan_remat", "per_block") if name == "qwen2_5_vl" else ("scan", "per_block")
    out = {}
    for mode in modes:
        model = nnx.merge(graphdef, jax.device_put(host))
        if mode == "scan_remat":
            assert apply_remat(model, "full") == cfg.text.num_hidden_layers + cfg.vision.depth
        trainer = Trainer(model, from_dict({"freeze": [[".*", "train"]]}), mesh())
        with monkeypatch.context() as m:
            if mode == "per_block":
                m.setattr(VisionTower, "run_blocks", per_block_run)
            out[mode] = _outputs(trainer, trainer.put_batch(batch))
    ref_logits, ref_loss, ref_grads = out.pop("per_block")
    assert any(p.startswith("visual.runs.") for p in ref_grads)
    for logits, loss, grads in out.values():
        assert _rel(logits, ref_logits) < 1e-5
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for p, g in grads.items():
            assert _rel(g, ref_grads[p]) < 1e-5, p


def test_blocks_are_stacked_per_run_with_a_layers_axis():
    cfg = _qwen2_5(8)
    assert block_runs(cfg.vision) == [range(k, 8, 4) for k in range(4)]
    tower = build_model(cfg, abstract=True).visual
    qkv = tower.runs[0].attn.qkv.kernel
    assert qkv.get_metadata()["sharding_axes"] == ("layers", "vit_embed", "vit_heads")
    assert qkv.shape[0] == 2
    # pattern positions 0-2 attend within windows, position 3 over whole images
    window = cfg.vision.window_patches
    assert [run.attn.max_segment for run in tower.runs] == [window, window, window, None]


def _vision_program(cfg):
    """The vision tower's forward pass, lowered (StableHLO text)."""
    model = build_model(cfg, abstract=True)
    _, _, _, vision = batch_to_model_inputs(next(SyntheticBatches(cfg, 2, 64, seed=1)))
    return jax.jit(lambda tower, v: tower(v)).lower(model.visual, vision).as_text()


def _instructions(text):
    return len(re.findall(r"^\s*(?:%\S+ = |\S+ = )", text, flags=re.M))


@pytest.mark.parametrize("make", [_qwen2_5, _qwen3], ids=["qwen2_5_vl", "qwen3_vl"])
def test_vision_program_does_not_grow_with_depth(make, monkeypatch):
    """Window / full blocks (period 4) and DeepStack taps (three, so four groups): as many loops
    and about as many instructions at 16 blocks as at 8."""
    texts = {n: _vision_program(make(n)) for n in (8, 16)}
    loops = {n: t.count("stablehlo.while") for n, t in texts.items()}
    sizes = {n: _instructions(t) for n, t in texts.items()}
    assert loops[8] >= 1 and loops[16] == loops[8], loops
    assert sizes[16] <= sizes[8] * 1.02 + 8, sizes
    # the per-block loop, for contrast, grows with every block
    monkeypatch.setattr(VisionTower, "run_blocks", per_block_run)
    loop = {n: _instructions(_vision_program(make(n))) for n in (8, 16)}
    assert loop[16] > loop[8] * 1.3, loop


def test_tiling_ends_a_group_at_each_cut():
    cfg = _qwen3(16)
    assert cfg.vision.deepstack_visual_indexes == (3, 7, 11)
    assert block_groups(cfg.vision) == tuple(LayerGroup(lo, 1, 4) for lo in (0, 4, 8, 12))


def test_checkpoints_keep_one_entry_per_block(tmp_path):
    cfg = _qwen2_5(8)
    model = build_model(cfg, seed=1)
    params = params_as_numpy(model)
    assert not any(p.startswith("visual.runs.") for p in params)
    blocks = {int(m.group(1)) for p in params if (m := re.match(r"visual\.blocks\.(\d+)\.", p))}
    assert blocks == set(range(8))
    stacked = np.asarray(model.visual.runs[3].attn.qkv.kernel.get_value())
    np.testing.assert_array_equal(params["visual.blocks.7.attn.qkv.kernel"], stacked[1])
    orbax_io.save_model(model, tmp_path / "a", config=cfg.to_dict(), chunk_bytes=2**16)
    assert orbax_io.stored_params(tmp_path / "a").keys() == params.keys()
    again = params_as_numpy(from_pretrained(tmp_path / "a", dtype="float32"))
    assert all(np.array_equal(again[k], params[k]) for k in params)
    # a folder that lacks one block's tensor is refused with a one-line reason naming it
    params.pop("visual.blocks.5.mlp.down_proj.kernel")
    orbax_io.save_model(params, tmp_path / "b", config=cfg.to_dict(), family=cfg.family)
    with pytest.raises(
        CheckpointError, match=r"lacks parameter visual\.blocks\.5\.mlp\.down_proj\."
    ):
        from_pretrained(tmp_path / "b", dtype="float32")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_run_per_block_is_the_same_tower(name):
    """The CPU inference layout (`one_run_per_layer`: each ViT block its own group of one, too)
    gives the stacked tower's output and DeepStack features, and the generator makes a new copy
    when any weight of the model changes (a stage that trains only the ViT)."""
    from qwenvl_jax.inference.generate import Generator
    from qwenvl_jax.models.text import one_run_per_layer

    cfg = CONFIGS[name]()
    model = build_model(cfg, seed=2)
    view = one_run_per_layer(model)
    assert view.visual.groups == tuple((i, 1, 1) for i in range(cfg.vision.depth))
    assert model.visual.groups == block_groups(cfg.vision)
    _, _, _, vision = batch_to_model_inputs(next(SyntheticBatches(cfg, 2, 64, seed=1)))
    run = jax.jit(lambda tower, v: tower(v))
    with jax.default_matmul_precision("highest"):
        want, got = run(model.visual, vision), run(view.visual, vision)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert _rel(np.asarray(b), np.asarray(a)) < 1e-5
    gen = Generator.for_model(model)
    first = gen.running_model()
    assert gen.running_model() is first
    qkv = model.visual.runs[0].attn.qkv.kernel
    qkv.set_value(qkv.get_value() * 2)
    second = gen.running_model()
    assert second is not first
    np.testing.assert_array_equal(
        np.asarray(second.visual.runs[0].attn.qkv.kernel.get_value()[0]),
        np.asarray(qkv.get_value()[0]),
    )
