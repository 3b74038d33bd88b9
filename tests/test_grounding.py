"""Box parsing and formatting for every family (qwenvl_jax.grounding)."""

from __future__ import annotations

import json

import pytest

from qwenvl_jax.errors import InputError
from qwenvl_jax.grounding import FAMILIES, format_box, format_boxes, parse_boxes
from qwenvl_jax.processing.image import smart_resize


def test_qwen_vl_boxes_map_like_the_original_drawing_code():
    text = "<ref>the cat</ref><box>(120,33),(560,999)</box>"
    # draw_bbox_on_latest_picture: int(x / 1000 * w)
    assert parse_boxes(text, "qwen_vl", (640, 480)) == [("the cat", (76, 15, 358, 479))]


def test_qwen_vl_several_boxes_one_ref_and_unnamed_boxes():
    text = (
        "Two <ref>cups</ref><box>(0,0),(500,500)</box><box>(500, 500),(999,999)</box> and "
        "something at <box>(100,100),(200,200)</box>."
    )
    boxes = parse_boxes(text, "qwen_vl", (1000, 2000))
    assert boxes == [
        ("cups", (0, 0, 500, 1000)),
        ("cups", (500, 1000, 999, 1998)),
        ("", (100, 200, 200, 400)),
    ]
    assert parse_boxes("no boxes here <ref>x</ref>", "qwen_vl", (10, 10)) == []


def test_qwen2_vl_tags():
    text = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
    assert parse_boxes(text, "qwen2_vl", (1000, 1000)) == [("dog", (10, 20, 30, 40))]
    assert parse_boxes(text, "qwen_vl", (1000, 1000)) == []


def test_qwen2_5_vl_absolute_json_in_the_model_input_size():
    text = (
        'Here:\n```json\n[\n\t{"bbox_2d": [28, 56, 280, 140], "label": "cup"},\n'
        '\t{"bbox_2d": [0, 0, 14, 14], "label": "spoon"}\n]\n```'
    )
    # the model saw a 560 x 280 input for a 1120 x 560 picture
    assert parse_boxes(text, "qwen2_5_vl", (1120, 560), input_size=(560, 280)) == [
        ("cup", (56, 112, 560, 280)),
        ("spoon", (0, 0, 28, 28)),
    ]
    h, w = smart_resize(1000, 1500, factor=28, min_pixels=3136, max_pixels=12845056)
    x = round(700 * 1500 / w)
    assert parse_boxes(
        '[{"bbox_2d": [700, 0, 700, 0], "label": "a"}]', "qwen2_5_vl", (1500, 1000)
    ) == [("a", (x, 0, x, 0))]


def test_qwen3_vl_relative_json_and_truncated_output():
    text = '```json\n[{"bbox_2d": [100, 200, 500, 1000], "label": "car"}, {"bbox_2d": [1, 2'
    for family in ("qwen3_vl", "qwen3_vl_moe"):
        assert parse_boxes(text, family, (2000, 1000)) == [("car", (200, 200, 1000, 1000))]
    assert parse_boxes('{"bbox_2d": [0, 0, 10, 10]}', "qwen3_vl", (100, 100)) == [
        ("", (0, 0, 1, 1))
    ]
    assert parse_boxes("I see nothing.", "qwen3_vl", (100, 100)) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_format_then_parse_round_trips(family):
    size = (640, 480)
    box = (64.0, 48.0, 320.0, 479.0)
    text = format_box("the red cup", box, family, size)
    [(label, parsed)] = parse_boxes(text, family, size)
    assert label == "the red cup"
    # the [0, 1000) grid loses at most one grid step (0.64 px here) plus the floor
    assert all(abs(a - b) <= 2 for a, b in zip(parsed, box))


def test_format_box_layouts():
    size = (1000, 500)
    assert format_box("cat", (120, 16.5, 560, 500), "qwen_vl", size) == (
        "<ref>cat</ref><box>(120,33),(560,999)</box>"
    )
    assert format_box(None, (0, 0, 10, 10), "qwen_vl", size) == "<box>(0,0),(10,20)</box>"
    assert json.loads(format_box("cat", (0, 0, 1000, 500), "qwen3_vl", size)) == {
        "bbox_2d": [0, 0, 1000, 1000],
        "label": "cat",
    }
    assert json.loads(
        format_box("猫", (10, 10, 20, 20), "qwen2_5_vl", size, input_size=(2000, 1000))
    ) == {"bbox_2d": [20, 20, 40, 40], "label": "猫"}


def test_format_boxes_groups_and_lists():
    size = (1000, 1000)
    items = [("cup", (0, 0, 10, 10)), ("cup", (20, 20, 30, 30)), ("plate", (1, 2, 3, 4))]
    assert format_boxes(items, "qwen_vl", size) == (
        "<ref>cup</ref><box>(0,0),(10,10)</box><box>(20,20),(30,30)</box>"
        "<ref>plate</ref><box>(1,2),(3,4)</box>"
    )
    for family in ("qwen_vl", "qwen2_vl", "qwen3_vl"):
        assert parse_boxes(format_boxes(items, family, size), family, size) == [
            (label, tuple(box)) for label, box in items
        ]


def test_bad_arguments():
    with pytest.raises(InputError, match="unknown family"):
        parse_boxes("", "llava", (10, 10))
    with pytest.raises(InputError, match="image_size"):
        parse_boxes("", "qwen_vl", (0, 10))
    with pytest.raises(InputError, match="image_size"):
        format_box("a", (0, 0, 1, 1), "qwen_vl", "640x480")
    with pytest.raises(InputError, match="x1, y1, x2, y2"):
        format_box("a", (0, 0, 1), "qwen_vl", (10, 10))


def test_v1_decoded_answer_parses(tmp_path):
    from qwenvl_jax.processing.qwen_vl_v1 import QwenTokenizer, QwenVLProcessor, find_tiktoken_file

    processor = QwenVLProcessor(QwenTokenizer(find_tiktoken_file(tmp_path)))
    answer = "<ref>the cup</ref><box>(250,500),(750,999)</box><|im_end|>"
    ids = processor.encode(answer)
    assert parse_boxes(processor.decode(ids), "qwen_vl", (400, 300)) == []
    text = processor.decode(ids, keep_box_tags=True)
    assert parse_boxes(text, "qwen_vl", (400, 300)) == [("the cup", (100, 150, 300, 299))]
