"""The data pipeline for Qwen-VL v1 (family "qwen_vl"), on the shared tiny fixture of the original
checkpoint (../shared/fixtures/qwen_vl_v1_tiny): the v1 processor's ChatML ids with a loss mask
on the replies, grounding boxes as `<ref>/<box>` in 0-1000, and a packed row that gives each
sample the logits it gets alone (slot positions restarting per sample, images in `<img>` order).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenvl_jax as qj
from qwenvl_jax.data.batch import V1_PIXELS, batch_to_model_inputs
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.sources import parse_sample
from qwenvl_jax.data.transforms import SampleTransform
from tests.checkpoints import v1_checkpoint
from tests.data_helpers import skimage_image, write_jsonl

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_v1_tiny"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="the shared v1 fixture is missing")
RTOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return v1_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def processor(checkpoint):
    return qj.Processor.from_pretrained(checkpoint)


@nnx.jit
def _forward(model, input_ids, segment_ids, position_ids, vision):
    return model.forward(input_ids, segment_ids, position_ids, vision)[0]


def _convs():
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": skimage_image("astronaut.png")},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "An astronaut."},
        ],
        [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Hi!"},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": skimage_image("coffee.png")},
                    {"type": "text", "text": "And this?"},
                ],
            },
            {"role": "assistant", "content": "A cup of coffee."},
        ],
    ]


def test_v1_ids_and_reply_mask(processor, checkpoint):
    config = qj.load_config(checkpoint)
    transform = SampleTransform(processor, config)
    conv = _convs()[1]
    ex = transform.example(parse_sample({"messages": conv}))
    alone = processor(conv, add_generation_prompt=False)
    # the same prompt ids, except the image name bytes inside <img>...</img>
    ids = alone["input_ids"][0]
    assert len(ex.input_ids) == len(ids)
    start = config.vision.image_start_id
    inside = (np.cumsum(ids == start) - np.cumsum(ids == start + 1) > 0) & (ids != start)
    np.testing.assert_array_equal(ex.input_ids[~inside], ids[~inside])
    np.testing.assert_allclose(ex.pixel_values, alone["pixel_values"])
    targets = processor.decode(ex.input_ids[ex.target_mask == 1], skip_special_tokens=False)
    assert targets == "Hi!<|im_end|>A cup of coffee.<|im_end|>"
    np.testing.assert_array_equal(ex.position_ids, np.tile(np.arange(len(ids)), (3, 1)))


def test_v1_grounding_box_is_written_as_ref_box(processor, checkpoint):
    transform = SampleTransform(processor, qj.load_config(checkpoint))
    sample = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": skimage_image("coffee.png")},
                    {"type": "text", "text": "Where is the cup?"},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "box", "label": "the cup", "box": [60, 40, 300, 200]}],
            },
        ]
    }
    ex = transform.example(parse_sample(sample))
    reply = processor.decode(ex.input_ids[ex.target_mask == 1], skip_special_tokens=False)
    # coffee.png is 600 x 400: x / 600 * 1000 and y / 400 * 1000
    assert reply == "<ref>the cup</ref><box>(100,100),(500,500)</box><|im_end|>"


def test_v1_packed_row_gives_each_sample_its_own_logits(processor, checkpoint, tmp_path):
    model = qj.from_pretrained(checkpoint, dtype="float32")
    convs = _convs()
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": c} for c in convs])
    config = {
        "train": str(data),
        "batch_size": 1,
        "seq_len": 1024,
        "max_images": 4,
        "shuffle": False,
        "num_epochs": 1,
        "prefetch": 0,
    }
    it = make_train_iterator(config, processor, model.config, 0, 1, seed=0)
    batch = next(it)
    it.close()
    assert batch[V1_PIXELS].shape == (4, 3, 448, 448)
    seg = batch["segment_ids"][0]
    assert seg.max() == 2
    ids, segment_ids, positions, vision = batch_to_model_inputs(batch)
    packed = np.asarray(
        _forward(
            model,
            jnp.asarray(ids),
            jnp.asarray(segment_ids),
            jnp.asarray(positions),
            jnp.asarray(vision),
        )
    )
    for s, conv in enumerate(convs, start=1):
        alone = processor(conv, add_generation_prompt=False)
        x = model.prepare(**alone)
        np.testing.assert_array_equal(positions[:, 0, seg == s], x.position_ids[:, 0])
        ref = np.asarray(
            _forward(model, x.input_ids, x.segment_ids, x.position_ids, jnp.asarray(x.vision))
        )[0]
        got = packed[0, seg == s]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < RTOL, f"sample {s}: relative error {err:.2e}"
