"""Packing: several samples with images in one row give each sample the logits it gets alone.

Tiny random checkpoints (tests/checkpoints.py, real Qwen vocabulary and chat templates) read with
`from_pretrained`; three conversations with real pictures of different sizes go through the whole
pipeline into one packed row (segment ids, per-sample M-RoPE positions, the images in one padded
vision batch with their own segment ids), then `model.forward(*batch_to_model_inputs(batch))`.
The reference for each sample is the model on that sample alone, from the processor's outputs
(`model.prepare(**inputs)` then `forward`, exactly what `model(**inputs)` does, jitted).
Qwen2.5-VL covers window attention in the ViT, Qwen3-VL DeepStack.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import load_config
from qwenvl_jax.data.batch import batch_to_model_inputs
from qwenvl_jax.data.packing import PackIterDataset
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.transforms import Example, Skipped
from qwenvl_jax.modeling import from_pretrained
from qwenvl_jax.processing.processor import Processor
from tests.checkpoints import make_checkpoint
from tests.data_helpers import skimage_image, small_pixels, write_jsonl

RTOL = 1e-4


@nnx.jit
def _forward(model, input_ids, segment_ids, position_ids, vision):
    return model.forward(input_ids, segment_ids, position_ids, vision)[0]


def _conversations():
    def turn(image, question, answer):
        return [{"role": "user", "content": [{"type": "image", "image": skimage_image(image)},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]

    return [
        turn("astronaut.png", "Who is this?", "An astronaut in a white suit."),
        turn("coffee.png", "What is in the cup?", "Coffee, it seems."),
        turn("chelsea.png", "Describe the animal.", "A cat with stripes.")
        + [{"role": "user", "content": "And its colour?"},
           {"role": "assistant", "content": "Orange and grey."}],
    ]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_row_gives_each_sample_its_own_logits(family, tmp_path):
    # images of 12 to 40 merged tokens: Qwen2.5-VL's 4x4-token windows split them
    folder = make_checkpoint(family, tmp_path / "ckpt", preprocessor=small_pixels(family, 12, 40))
    processor = Processor.from_pretrained(folder)
    model = from_pretrained(folder, dtype="float32")
    convs = _conversations()
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": c} for c in convs])
    config = {"train": str(data), "batch_size": 1, "seq_len": 512, "max_patches": 768,
              "shuffle": False, "num_epochs": 1, "prefetch": 0}
    it = make_train_iterator(config, processor, model.config, 0, 1, seed=0)
    batch = next(it)
    it.close()
    seg = batch["segment_ids"][0]
    assert seg.max() == 3, "the three samples should share one row"
    assert (batch["vision.segment_ids"] > 0).sum() > 0

    ids, segment_ids, positions, vision = batch_to_model_inputs(batch)
    packed = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(segment_ids),
                                 jnp.asarray(positions), vision))
    for s, conv in enumerate(convs, start=1):
        alone = processor(conv, add_generation_prompt=False)
        np.testing.assert_array_equal(ids[0, seg == s], alone["input_ids"][0])
        x = model.prepare(**alone)
        ref = np.asarray(_forward(model, x.input_ids, x.segment_ids, x.position_ids, x.vision))[0]
        np.testing.assert_array_equal(positions[:, 0, seg == s], x.position_ids[:, 0])
        got = packed[0, seg == s]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < RTOL, f"sample {s}: relative error {err:.2e}"


# ---------------------------------------------------------------------------- the packer alone

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_configs"


def _text_example(n: int, tag: int) -> Example:
    ids = np.full(n, tag, np.int32)
    return Example(ids, np.ones(n, np.uint8), np.tile(np.arange(n, dtype=np.int32), (3, 1)))


def _pack_stream(elements, **kw):
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
