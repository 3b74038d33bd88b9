"""Sources: both JSONL forms parsed into HF messages, malformed records as counted errors,
self-contained ArrayRecord records, and TFDS datasets read through `tfds.data_source`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwenvl_jax.config import load_config
from qwenvl_jax.data.arrayrecord import decode_record, encode_record
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.sources import (
    Blob,
    JsonlSource,
    RawRecord,
    open_source,
    parse_sample,
    record_messages,
)
from qwenvl_jax.data.stats import MALFORMED, SampleError
from qwenvl_jax.data.transforms import SampleTransform
from qwenvl_jax.processing.processor import Processor
from tests.data_helpers import processor_folder, skimage_image, write_jsonl


def test_hf_messages_with_relative_paths_and_listed_media(tmp_path):
    sample = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "a"},
                    {"type": "image", "image": "/abs/b.png"},
                ],
            },
            {"role": "assistant", "content": "ok"},
        ],
        "images": ["sub/a.png"],
    }
    messages = parse_sample(sample, tmp_path)
    content = messages[0]["content"]
    assert content[0] == {"type": "image", "image": str(tmp_path / "sub/a.png")}
    assert content[2] == {"type": "image", "image": "/abs/b.png"}
    assert messages[1] == {"role": "assistant", "content": "ok"}


def test_sharegpt_form_with_image_tags_and_untagged_media(tmp_path):
    tagged = parse_sample(
        {
            "conversations": [
                {"from": "human", "value": "Look <image> and <image>!"},
                {"from": "gpt", "value": "Two."},
            ],
            "images": ["1.png", "2.png"],
            "system": "Be nice.",
        },
        tmp_path,
    )
    assert tagged[0] == {"role": "system", "content": "Be nice."}
    assert tagged[1]["content"] == [
        {"type": "text", "text": "Look "},
        {"type": "image", "image": str(tmp_path / "1.png")},
        {"type": "text", "text": " and "},
        {"type": "image", "image": str(tmp_path / "2.png")},
        {"type": "text", "text": "!"},
    ]
    assert tagged[2] == {"role": "assistant", "content": "Two."}
    # LLaVA convention: media without a tag open the first user turn
    untagged = parse_sample(
        {
            "conversations": [
                {"from": "human", "value": "What?"},
                {"from": "gpt", "value": "A cat."},
            ],
            "image": "c.png",
            "video": "v.mp4",
        },
        tmp_path,
    )
    assert untagged[0]["content"] == [
        {"type": "image", "image": str(tmp_path / "c.png")},
        {"type": "video", "video": str(tmp_path / "v.mp4")},
        {"type": "text", "text": "What?"},
    ]


@pytest.mark.parametrize(
    "record",
    [
        "[1, 2]",
        '{"text": "no conversation"}',
        '{"messages": []}',
        '{"messages": [{"role": "user", "content": "no reply"}]}',
        '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        '{"conversations": [{"from": "human", "value": "<image> two <image>"}, '
        '{"from": "gpt", "value": "y"}], "image": "one.png"}',
        '{"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": '
        '"y"}], "images": ["a.png", "unused.png"]}',
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
        '[{"type": "box", "label": "a", "box": [10, 10, 5]}]}]}',
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
        '{"messages": [{"role": "user", "conte',
    ],
)
def test_malformed_records_raise_sample_errors(record):
    with pytest.raises(SampleError) as e:
        record_messages(RawRecord("json", record, "/data"))
    assert e.value.reason == MALFORMED


def test_jsonl_source_skips_blank_lines_and_is_thread_safe(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": 2}\n{"c": 3}')
    source = JsonlSource(path)
    assert len(source) == 3
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: source[i % 3].payload, range(300)))
    assert [json.loads(t) for t in texts[:3]] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert all(json.loads(t) == json.loads(texts[i % 3]) for i, t in enumerate(texts))


def test_array_record_records_carry_their_media(tmp_path):
    image = skimage_image("coffee.png")
    frames = [skimage_image("astronaut.png"), skimage_image("chelsea.png")]
    messages = parse_sample(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "video", "video": frames, "fps": 1.0},
                        {"type": "text", "text": "hi"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "box", "label": "cup", "box": [1, 2, 3, 4]}],
                },
            ]
        }
    )
    data = encode_record(messages, {"tokens": 7})
    back = decode_record(data)
    content = back[0]["content"]
    assert content[0]["image"] == Blob("coffee.png", Path(image).read_bytes())
    assert [f.data for f in content[1]["video"]] == [Path(f).read_bytes() for f in frames]
    assert content[1]["fps"] == 1.0 and content[2] == {"type": "text", "text": "hi"}
    assert back[1] == messages[1]
    with pytest.raises(SampleError):
        decode_record(data[:-10])
    with pytest.raises(SampleError):
        decode_record(b"something else")


def test_tfds_dataset_through_data_source(tmp_path):
    """A TFDS dataset prepared in the ArrayRecord format, read without TensorFlow: images as
    encoded bytes, the conversation as JSON text; it gives the examples the JSONL form gives."""
    import tensorflow_datasets as tfds

    png = [Path(skimage_image(n)).read_bytes() for n in ("coffee.png", "chelsea.png")]

    class TinyVqa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "conversations": tfds.features.Text(),
                        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, data in enumerate(png):
                turns = [
                    {"from": "human", "value": f"<image>\nsample {i}?"},
                    {"from": "gpt", "value": f"answer {i}"},
                ]
                yield i, {"conversations": json.dumps(turns), "image": data}

    TinyVqa(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    source = open_source("tfds:tiny_vqa:train", tfds_data_dir=str(tmp_path / "tfds"))
    assert len(source) == 2

    folder = processor_folder("qwen2_vl", tmp_path / "ckpt")
    processor, config = Processor.from_pretrained(folder), load_config(folder)
    transform = SampleTransform(processor, config)
    for i in range(2):
        ex = transform(source[i])
        question = processor.decode(ex.input_ids)
        k = int(question.split("sample ")[1][0])
        names = ("coffee.png", "chelsea.png")
        ref = processor(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": skimage_image(names[k])},
                        {"type": "text", "text": f"\nsample {k}?"},
                    ],
                },
                {"role": "assistant", "content": f"answer {k}"},
            ],
            add_generation_prompt=False,
        )
        np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
        np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])
    it = make_train_iterator(
        {
            "train": "tfds:tiny_vqa:train",
            "tfds_data_dir": str(tmp_path / "tfds"),
            "batch_size": 1,
            "seq_len": 256,
            "max_patches": 256,
            "num_epochs": 1,
        },
        processor,
        config,
        0,
        1,
    )
    assert sum(1 for _ in it) >= 1 and it.stats.samples == 2
    it.close()


def test_jsonl_records_name_their_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, "oops"])
    assert JsonlSource(path)[1].key == "x.jsonl:2"
