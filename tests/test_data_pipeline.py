"""The Grain pipeline: the batch contract, exact resumption through an Orbax checkpoint (in
process and with worker processes), disjoint shards per process that cover the data, bad samples
counted (or an error when strict), and the padding share it reports.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.data.batch import batch_spec, padding_share
from qwenvl_jax.data.pipeline import (
    DataConfig,
    checkpoint_restore,
    checkpoint_save,
    make_train_iterator,
)
from qwenvl_jax.data.stats import CORRUPT_MEDIA, MALFORMED, MISSING_MEDIA, TOO_LONG, SampleError
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.processing.processor import Processor
from tests.data_helpers import conversations, copy_images, processor_folder, write_jsonl

FAMILY = "qwen2_5_vl"
N = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    folder = processor_folder(FAMILY, root / "ckpt")
    copy_images(root / "data")
    data = write_jsonl(root / "data" / "train.jsonl", conversations(N, seed=1))
    return Processor.from_pretrained(folder), load_config(folder), data


def _config(data: Path, **kw) -> dict:
    return {"train": str(data), "batch_size": 2, "seq_len": 256, "max_patches": 128, **kw}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _sample_numbers(processor, batch) -> list[int]:
    """The `sample <i>` number of every packed sample of a batch."""
    out = []
    for b, row in enumerate(batch["segment_ids"]):
        for s in range(1, row.max() + 1):
            text = processor.decode(batch["input_ids"][b][row == s])
            out.append(int(re.search(r"sample (\d+):", text).group(1)))
    return out


def test_batches_follow_the_contract(env):
    processor, config, data = env
    it = make_train_iterator(_config(data), processor, config, 0, 1, seed=0)
    spec = batch_spec(config, 2, 256, max_patches=128)
    shares = []
    for _ in range(4):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
        seg, ids, tgt = batch["segment_ids"], batch["input_ids"], batch["targets"]
        for b in range(2):
            for s in range(1, seg[b].max() + 1):
                at = np.flatnonzero(seg[b] == s)
                assert np.array_equal(at, np.arange(at[0], at[-1] + 1))  # contiguous
                np.testing.assert_array_equal(tgt[b, at[:-1]], ids[b, at[1:]])
                assert tgt[b, at[-1]] == 0 and batch["loss_mask"][b, at[-1]] == 0
                assert batch["loss_mask"][b, at[:-1]].sum() > 0
        pad = seg == 0
        assert not tgt[pad].any() and not batch["loss_mask"][pad].any()
        # images in row-major order: the vision segments hold the batch's image patches
        n_image_tokens = int((ids == config.image_token_id).sum())
        assert int((batch["vision.segment_ids"] > 0).sum()) == 4 * n_image_tokens
        shares.append(padding_share(batch))
    assert it.padding_share == pytest.approx(np.mean(shares))
    assert it.stats.samples > 4 and it.stats.num_skipped == 0
    it.close()


def test_resume_from_an_orbax_checkpoint_gives_the_same_batches(env, tmp_path):
    processor, config, data = env
    cfg = _config(data)
    straight = make_train_iterator(cfg, processor, config, 0, 1, seed=3)
    expected = [next(straight) for _ in range(10)]  # more than one epoch
    straight.close()

    first = make_train_iterator(cfg, processor, config, 0, 1, seed=3)
    for k in range(4):
        assert _equal(next(first), expected[k])
    stats = first.stats.to_dict()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=checkpoint_save(first)))
        manager.wait_until_finished()
    first.close()

    resumed = make_train_iterator(cfg, processor, config, 0, 1, seed=3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(4, args=ocp.args.Composite(data=checkpoint_restore(resumed)))
    assert resumed.stats.to_dict() == stats
    for k in range(4, 10):
        assert _equal(next(resumed), expected[k]), f"batch {k} differs after the restore"
    resumed.close()


def test_resume_with_worker_processes(env):
    processor, config, data = env
    cfg = _config(data, num_workers=2)
    it = make_train_iterator(cfg, processor, config, 0, 1, seed=5)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it.close()
    again = make_train_iterator(cfg, processor, config, 0, 1, seed=5)
    again.set_state(state)
    assert all(_equal(next(again), e) for e in expected)
    assert again.stats.batches == 6
    again.close()


def test_the_seed_decides_the_order(env):
    processor, config, data = env

    def order(seed: int) -> list[int]:
        it = make_train_iterator(_config(data, num_epochs=1), processor, config, 0, 1, seed=seed)
        numbers = [n for batch in it for n in _sample_numbers(processor, batch)]
        it.close()
        return numbers

    first = order(11)
    assert sorted(first) == list(range(N))
    assert order(11) == first
    assert order(12) != first


def test_two_processes_read_disjoint_shards_that_cover_the_data(env):
    processor, config, data = env
    seen = []
    for process in range(2):
        it = make_train_iterator(_config(data, num_epochs=1), processor, config, process, 2, seed=7)
        numbers = [n for batch in it for n in _sample_numbers(processor, batch)]
        assert it.stats.samples == len(numbers) == N // 2
        seen.append(set(numbers))
        it.close()
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N))


def test_bad_samples_are_counted_and_skipped(env, tmp_path):
    processor, config, data = env
    folder = data.parent
    (folder / "broken.png").write_bytes(b"not a png at all")
    good = conversations(6, seed=2, image_dir=str(folder))
    bad = [
        '{"messages": [{"role": "user", "content": "unterminated',  # malformed line
        {"messages": [{"role": "user", "content": "no reply"}]},  # no assistant turn
        {
            "conversations": [
                {"from": "human", "value": "<image> what?"},
                {"from": "gpt", "value": "x"},
            ],
            "image": "missing.png",
        },
        {
            "conversations": [
                {"from": "human", "value": "<image> what?"},
                {"from": "gpt", "value": "x"},
            ],
            "image": "broken.png",
        },
        {
            "conversations": [
                {"from": "human", "value": "long " * 400},
                {"from": "gpt", "value": "x"},
            ]
        },
    ]
    path = write_jsonl(folder / "mixed.jsonl", good[:3] + bad + good[3:])
    it = make_train_iterator(_config(path, num_epochs=1), processor, config, 0, 1, seed=0)
    batches = list(it)
    assert batches
    assert it.stats.samples == 6
    assert it.stats.skipped == {MALFORMED: 2, MISSING_MEDIA: 1, CORRUPT_MEDIA: 1, TOO_LONG: 1}
    assert it.stats.summary() == "samples 6, skipped 5"
    it.close()

    strict = make_train_iterator(
        _config(path, num_epochs=1, strict=True, shuffle=False), processor, config, 0, 1, seed=0
    )
    with pytest.raises(SampleError):
        list(strict)
    strict.close()


def test_a_source_of_only_bad_samples_stops_the_run(env, tmp_path):
    processor, config, _ = env
    path = write_jsonl(tmp_path / "bad.jsonl", ["{not json"] * 5)
    it = make_train_iterator(_config(path, max_consecutive_skips=20), processor, config, 0, 1)
    with pytest.raises(SampleError, match="the last 20 samples were all skipped"):
        next(it)
    it.close()


def test_data_config_errors_are_one_line(env):
    processor, config, data = env
    with pytest.raises(ConfigError, match="unknown data config key 'shufle'"):
        DataConfig.from_any({"train": str(data), "shufle": False})
    with pytest.raises(ConfigError, match="data.train is not set"):
        DataConfig.from_any({"batch_size": 2})
    with pytest.raises(ConfigError, match="multiple of 4"):
        DataConfig.from_any({"train": str(data), "max_patches": 10})
