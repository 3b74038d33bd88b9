"""A training batch's patches in groups (one per data-parallel shard): the model gives the same
logits whatever the grouping, the packer keeps each group inside its own budget, and every
process of a multi-process run makes its own share of the groups."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.data.batch import batch_spec, batch_to_model_inputs
from qwenvl_jax.data.packing import Packer
from qwenvl_jax.data.transforms import Example
from qwenvl_jax.modeling import build_model
from qwenvl_jax.train.synthetic import SyntheticBatches


def _logits(model, batch):
    ids, seg, pos, vision = batch_to_model_inputs(batch)
    with jax.default_matmul_precision("highest"):
        logits, _, _ = jax.jit(lambda *a: model.forward(*a))(ids, seg, pos, vision)
    return np.asarray(logits)


@pytest.mark.parametrize("preset", ["tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_qwen2_vl"])
def test_grouped_patches_give_the_logits_of_one_group(preset):
    """Windows (Qwen2.5), DeepStack (Qwen3) and plain (Qwen2): four groups of two rows each
    equal one group of all eight rows (same samples; only where the patches sit differs)."""
    config = load_config(preset)
    model = build_model(config, seed=0)
    one = SyntheticBatches(config, 8, 96, seed=3, max_patches=512, groups=1).batch(0)
    four = SyntheticBatches(config, 8, 96, seed=3, max_patches=512, groups=4).batch(0)
    for key in ("input_ids", "segment_ids", "position_ids"):
        np.testing.assert_array_equal(one[key], four[key])
    assert one["vision.pixels"].shape[:2] == (1, 512)
    assert four["vision.pixels"].shape[:2] == (4, 128)
    assert all((four["vision.segment_ids"][g] > 0).any() for g in range(4))  # all groups used
    a, b = _logits(model, one), _logits(model, four)
    live = one["segment_ids"] > 0
    np.testing.assert_allclose(b[live], a[live], rtol=1e-5, atol=1e-5)


def _example(tokens: int, patches: int, patch_dim: int = 1176) -> Example:
    side = int(np.sqrt(patches))
    return Example(
        input_ids=np.ones(tokens, np.int64),
        target_mask=np.ones(tokens, np.float32),
        position_ids=np.zeros((3, tokens), np.int64),
        pixel_values=np.zeros((patches, patch_dim), np.float32),
        image_grid_thw=np.asarray([[1, side, side]]),
    )


def test_packer_keeps_each_group_within_its_share():
    config = load_config("tiny_qwen2_vl")
    packer = Packer(config, 4, 64, max_patches=128, groups=2)  # rows 0-1 and 2-3, 64 each
    assert packer.add(_example(8, 64))  # group 0 full of patches
    assert packer.add(_example(8, 16))  # row 0 has room for tokens, its group none: row 2
    assert [len(r) for r in packer.rows] == [1, 0, 1, 0]
    assert packer.add(_example(8, 36))
    assert not packer.add(_example(8, 16))  # 48 + 16 > 64 in group 1, group 0 is full
    assert not packer.fits(_example(8, 100))  # above one group's share: never fits
    batch = packer.build()
    spec = batch_spec(config, 4, 64, max_patches=128, vision_groups=2)
    assert {k: v.shape for k, v in batch.items()} == {k: s for k, (s, _) in spec.items()}
    counts = (batch["vision.segment_ids"] > 0).sum(axis=1)
    np.testing.assert_array_equal(counts, [64, 52])


def test_an_indivisible_grouping_is_refused():
    config = load_config("tiny_qwen2_vl")
    with pytest.raises(ValueError, match="vision groups"):
        Packer(config, 4, 64, max_patches=128, groups=3)
    with pytest.raises(ValueError, match="vision groups"):
        SyntheticBatches(config, 4, 64, max_patches=120, groups=4)
