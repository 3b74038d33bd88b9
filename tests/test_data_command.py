"""`qwenvl-jax data`: JSONL plus media into self-contained ArrayRecord shards, the last line
`samples N, skipped M`, exit 0 when something was written and 2 otherwise; the shards give the
examples the JSONL file gives, without the original media.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwenvl_jax.cli import main
from qwenvl_jax.config import load_config
from qwenvl_jax.data.arrayrecord import record_meta
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.data.sources import JsonlSource, open_source
from qwenvl_jax.data.transforms import SampleTransform
from qwenvl_jax.errors import InputError
from qwenvl_jax.processing.processor import Processor
from tests.checkpoints import v1_checkpoint
from tests.data_helpers import conversations, copy_images, processor_folder, write_jsonl


def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(["data", *argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip().splitlines()


def _mixed_jsonl(folder):
    copy_images(folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    bad = [
        "this is not json",
        {
            "conversations": [
                {"from": "human", "value": "<image> hi"},
                {"from": "gpt", "value": "x"},
            ],
            "image": "nowhere.png",
        },
        {
            "conversations": [
                {"from": "human", "value": "<image> hi"},
                {"from": "gpt", "value": "x"},
            ],
            "image": "broken.jpg",
        },
    ]
    return write_jsonl(
        folder / "train.jsonl", conversations(8, seed=4)[:4] + bad + conversations(8, seed=4)[4:]
    )


def test_convert_counts_and_exit_status(tmp_path, capsys):
    src = _mixed_jsonl(tmp_path / "data")
    dst = tmp_path / "shards"
    code, out, err = _run(capsys, str(src), str(dst), "--records-per-shard", "3")
    assert code == 0
    assert out[-1] == "samples 8, skipped 3"
    meta = json.loads((dst / "metadata.json").read_text())
    assert meta["samples"] == 8
    assert meta["skipped"] == {"malformed": 1, "missing_media": 1, "corrupt_media": 1}
    assert [s["records"] for s in meta["shards"]] == [3, 3, 2]
    assert sorted(p.name for p in dst.glob("*.array_record")) == [s["file"] for s in meta["shards"]]
    # an existing output folder is refused in one line
    code, out, err = _run(capsys, str(src), str(dst))
    assert code == 2 and len(err) == 1 and "not empty" in err[0]


def test_nothing_usable_exits_2_and_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": []}])
    dst = tmp_path / "out"
    code, out, err = _run(capsys, str(src), str(dst))
    assert code == 2
    assert out[-1] == "samples 0, skipped 2"
    assert not dst.exists() and not list(tmp_path.glob(".out*"))
    code, out, err = _run(capsys, str(tmp_path / "missing.jsonl"), str(dst))
    assert code == 2 and len(err) == 1 and "missing.jsonl" in err[0]


def test_shards_are_self_contained_and_give_the_jsonl_examples(tmp_path, capsys):
    src = _mixed_jsonl(tmp_path / "data")
    folder = processor_folder("qwen2_5_vl", tmp_path / "ckpt")
    processor, config = Processor.from_pretrained(folder), load_config(folder)
    transform = SampleTransform(processor, config)
    good = JsonlSource(src)
    expected = []
    for i in range(len(good)):
        try:
            expected.append(transform(good[i]))
        except InputError:
            continue
    assert len(expected) == 8

    code, out, _ = _run(
        capsys, str(src), str(tmp_path / "shards"), "--model", str(folder), "--family", "qwen2_5_vl"
    )
    assert code == 0 and out[-1] == "samples 8, skipped 3"
    shutil.rmtree(tmp_path / "data")  # the shards must not need the original media
    shards = open_source(tmp_path / "shards")
    assert len(shards) == 8
    for k, want in enumerate(expected):
        record = shards[k]
        got = transform(record)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.target_mask, want.target_mask)
        if want.pixel_values is not None:
            np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
        assert record_meta(record.payload) == {
            "tokens": want.num_tokens,
            "patches": want.num_patches,
            "images": 0,
        }

    it = make_train_iterator(
        {
            "train": str(tmp_path / "shards"),
            "batch_size": 2,
            "seq_len": 256,
            "max_patches": 128,
            "num_epochs": 1,
        },
        processor,
        config,
        0,
        1,
    )
    assert sum(1 for _ in it) >= 2
    assert it.stats.samples == 8 and it.stats.num_skipped == 0
    it.close()


def test_model_family_mismatch_is_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", conversations(2))
    folder = processor_folder("qwen2_vl", tmp_path / "ckpt")
    code, out, err = _run(
        capsys, str(src), str(tmp_path / "o"), "--model", str(folder), "--family", "qwen3_vl"
    )
    assert code == 2 and len(err) == 1 and "does not match" in err[0]
    assert np.all([not p.name.startswith(".o") for p in tmp_path.iterdir()])


# ------------------------------------------------------------------ hostile input


def _chat(question: str, answer: str = "ok") -> dict:
    return {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    }


def _long_jsonl(folder):
    copy_images(folder)
    long_by_count = _chat("sample long: " + "the cat sat " * 300)  # ~900 tokens, 3.6 kB
    huge = _chat("sample huge: " + "word " * 40_000)  # 200 kB: at least 1,563 tokens by size
    return write_jsonl(folder / "train.jsonl", [long_by_count, *conversations(4, seed=1), huge])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen_vl"])
def test_too_long_samples_are_skipped_and_counted(
    family, tmp_path, tmp_path_factory, capsys, caplog, monkeypatch
):
    from qwenvl_jax.processing.qwen_vl_v1 import QwenTokenizer
    from qwenvl_jax.processing.tokenizer import TextTokenizer

    src = _long_jsonl(tmp_path / "data")
    if family == "qwen_vl":
        folder, cls, method = v1_checkpoint(tmp_path_factory), QwenTokenizer, "encode"
    else:
        folder = processor_folder(family, tmp_path / "ckpt")
        cls, method = TextTokenizer, "encode_batch"
    seen: list[int] = []
    encode = getattr(cls, method)

    def spy(self, texts, *args):
        seen.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
        return encode(self, texts, *args)

    monkeypatch.setattr(cls, method, spy)
    code, out, err = _run(
        capsys, str(src), str(tmp_path / "out"), "--model", str(folder), "--max-tokens", "600"
    )
    assert code == 0
    assert out[-1] == "samples 4, skipped 2"
    assert "skipped: too_long 2" in err
    warnings = [r.getMessage() for r in caplog.records]
    assert any("line 1 " in w and "more than the 600" in w for w in warnings)  # counted tokens
    assert any("line 6 " in w and "bytes of text, so at least" in w for w in warnings)  # by size
    assert 0 < max(seen) < 10_000  # the 200 kB text never reached the tokenizer
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["samples"] == 4 and meta["skipped"] == {"too_long": 2}
    shards = open_source(tmp_path / "out")
    assert all(record_meta(shards[i].payload)["tokens"] <= 600 for i in range(len(shards)))


def test_max_tokens_defaults_to_the_model_context(tmp_path, capsys):
    src = _long_jsonl(tmp_path / "data")
    folder = processor_folder("qwen2_5_vl", tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 500
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["max_position_embeddings"] = 500
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = _run(capsys, str(src), str(tmp_path / "out"), "--model", str(folder))
    assert code == 0 and out[-1] == "samples 4, skipped 2"
    assert "skipped: too_long 2" in err


def test_max_tokens_without_a_model_is_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", conversations(2))
    code, out, err = _run(capsys, str(src), str(tmp_path / "o"), "--max-tokens", "100")
    assert code == 2 and len(err) == 1 and "--max-tokens needs --model" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_media_outside_the_jsonl_folder_are_refused_unless_a_media_root(tmp_path, capsys, caplog):
    data, outside = tmp_path / "data", tmp_path / "outside"
    copy_images(data)
    copy_images(outside)
    (data / "link.png").symlink_to(outside / "coffee.png")
    (data / "linked_dir").symlink_to(outside)

    def with_image(image: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": image}, "what is it?"]},
                {"role": "assistant", "content": "a picture"},
            ]
        }

    sources = [
        "../outside/coffee.png",  # .. leaves the folder
        str(outside / "coffee.png"),  # absolute
        f"file://{outside / 'coffee.png'}",
        "link.png",  # a symbolic link to a file outside
        "linked_dir/coffee.png",  # through a symbolic link to a folder outside
    ]
    src = write_jsonl(
        data / "train.jsonl",
        [with_image(s) for s in sources]
        + [with_image("coffee.png"), with_image(str(data / "coffee.png"))],
    )
    code, out, err = _run(capsys, str(src), str(tmp_path / "out"))
    assert code == 0
    assert out[-1] == "samples 2, skipped 5"
    assert "skipped: media_outside_root 5" in err
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("lies outside the media folder" in w for w in warnings) == 5
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["skipped"] == {"media_outside_root": 5}

    code, out, err = _run(capsys, str(src), str(tmp_path / "out2"), "--media-root", str(outside))
    assert code == 0 and out[-1] == "samples 7, skipped 0"

    code, out, err = _run(
        capsys, str(src), str(tmp_path / "out3"), "--media-root", str(tmp_path / "nowhere")
    )
    assert code == 2 and len(err) == 1 and "media root not found" in err[0]
    assert not (tmp_path / "out3").exists()
