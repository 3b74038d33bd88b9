"""Packing: several samples with images in one row give each sample the logits it gets alone,
and the packer's first-fit placement, deferral and state replay.

Tiny random checkpoints (tests/checkpoints.py, real Qwen vocabulary and chat templates) read with
`from_pretrained`; three conversations with real pictures of different sizes and one with a real
video clip go through the whole pipeline into one packed row (segment ids, per-sample M-RoPE
positions, the images then the video in one padded vision batch with their own segment ids), then
`model.forward(*batch_to_model_inputs(batch))`; see `tests.data_helpers.check_packed_parity`.
Qwen2.5-VL covers window attention in the ViT; Qwen3-VL (DeepStack) is in
test_data_packing_qwen3.py.
"""

from __future__ import annotations

from pathlib import Path

import grain
import numpy as np
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.data.packing import PackIterDataset
from qwenvl_jax.data.transforms import Example, Skipped
from tests.data_helpers import check_packed_parity


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_row_gives_each_sample_its_own_logits(family, tmp_path):
    check_packed_parity(family, tmp_path)


# ---------------------------------------------------------------------------- the packer alone

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_configs"


def _text_example(n: int, tag: int) -> Example:
    ids = np.full(n, tag, np.int32)
    return Example(ids, np.ones(n, np.uint8), np.tile(np.arange(n, dtype=np.int32), (3, 1)))


def _pack_stream(elements, **kw):
    if not (REFERENCE / "Qwen__Qwen2-VL-2B-Instruct").is_dir():
        pytest.skip(f"{REFERENCE} is missing")
    config = load_config(REFERENCE / "Qwen__Qwen2-VL-2B-Instruct")
    parent = grain.MapDataset.source(elements).to_iter_dataset()
    return iter(PackIterDataset(parent, config, kw.pop("batch_size", 2), 10, **kw))


def _stream_elements():
    lengths = [6, 7, 3, 9, 2, 8, 5, 5, 10, 1, 4, 6, 7, 2, 3]
    elements = [_text_example(n, tag=i + 1) for i, n in enumerate(lengths)]
    elements.insert(4, Skipped("malformed", "line 5", "broken"))
    elements.insert(9, Skipped("too_long", "line 10", "long"))
    return elements


def test_first_fit_rows_and_deferred_samples():
    batches = list(_pack_stream(_stream_elements()))
    placed = []
    for batch, _ in batches:
        for row in range(2):
            seg = batch["segment_ids"][row]
            assert np.count_nonzero(seg) <= 10
            placed += [int(batch["input_ids"][row][seg == s][0]) for s in range(1, seg.max() + 1)]
    assert sorted(placed) == list(range(1, 16))  # every sample exactly once
    assert placed[:3] == [1, 3, 2]  # 6 and 3 share row 0, 7 goes to row 1
    assert sum(s["samples"] for _, s in batches) == 15
    assert sum(sum(s["skipped"].values()) for _, s in batches) == 2


def test_pack_state_restores_waiting_samples_and_counts():
    elements = _stream_elements()
    straight = list(_pack_stream(elements, max_pending=2))
    for k in range(len(straight)):
        it = _pack_stream(elements, max_pending=2)
        for _ in range(k):
            next(it)
        state = it.get_state()
        resumed = _pack_stream(elements, max_pending=2)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(straight) - k
        for (batch, stats), (want, want_stats) in zip(rest, straight[k:]):
            assert stats == want_stats
            assert all(np.array_equal(batch[key], want[key]) for key in want)
