"""The Processor of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE checkpoints: chat messages in,
the arrays the model takes out, named, typed and laid out as HF's processor returns them.

    processor = Processor.from_pretrained(path)
    inputs = processor(messages)                     # one conversation or a list of them
    text = processor.apply_chat_template(messages)   # the rendered prompt
    processor.decode(token_ids)

`from_pretrained` reads config.json's `model_type`; "qwen" (Qwen-VL v1) is handed to
`qwenvl_jax.processing.qwen_vl_v1.QwenVLProcessor`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.config import CAPABILITIES, capabilities
from qwenvl_jax.errors import CheckpointError, ConfigError, InputError
from qwenvl_jax.processing.chat import render_chat_template
from qwenvl_jax.processing.image import ImageInput, PixelConfig, preprocess_images
from qwenvl_jax.processing.tokenizer import TextTokenizer, read_json
from qwenvl_jax.processing.video import (
    VideoConfig,
    VideoFrames,
    VideoInput,
    frame_timestamps,
    load_video,
    preprocess_video,
)

logger = logging.getLogger(__name__)

# The families processed by their own processor of this kind (Qwen-VL v1's is qwen_vl_v1.py).
FAMILIES = tuple(
    f for f, c in CAPABILITIES.items() if c.processor is None and not c.fixed_size_images
)
_FAMILY_OF_PROCESSOR_CLASS = {
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen3VLProcessor": "qwen3_vl",
}

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"


def detect_family(path: str | Path) -> str:
    """The family of a checkpoint folder: config.json's `model_type`, else the
    `processor_class` of preprocessor_config.json."""
    path = Path(path)
    config = read_json(path / "config.json")
    if config is not None and config.get("model_type"):
        return config["model_type"]
    pre = read_json(path / "preprocessor_config.json") or {}
    if pre.get("processor_class") in _FAMILY_OF_PROCESSOR_CLASS:
        return _FAMILY_OF_PROCESSOR_CLASS[pre["processor_class"]]
    raise ConfigError(f"cannot tell the model family of {path}: no config.json with a model_type")


def _read_chat_template(path: Path, processor_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's chat template, in HF's order of preference: processor_config.json,
    chat_template.json, chat_template.jinja, tokenizer_config.json."""

    def pick(value: Any) -> str | None:
        if isinstance(value, Mapping):
            return value.get("default")
        if isinstance(value, list):  # tokenizer_config.json: [{"name": ..., "template": ...}]
            return next((t["template"] for t in value if t.get("name") == "default"), None)
        return value

    if processor_config.get("chat_template") is not None:
        return pick(processor_config["chat_template"])
    legacy = read_json(path / "chat_template.json")
    if legacy is not None and legacy.get("chat_template") is not None:
        return pick(legacy["chat_template"])
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = read_json(path / "tokenizer_config.json") or {}
    return pick(tokenizer_config.get("chat_template"))


def _eos_token_ids(path: Path, tokenizer: TextTokenizer) -> list[int]:
    """generation_config.json's eos_token_id, else config.json's, else the tokenizer's eos."""
    config = read_json(path / "config.json") or {}
    for source in (read_json(path / "generation_config.json"), config, config.get("text_config")):
        value = (source or {}).get("eos_token_id")
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _image_source(item: Mapping[str, Any]) -> Any:
    for key in ("image", "url", "path", "image_url"):
        if key in item:
            value = item[key]
            return value.get("url") if key == "image_url" and isinstance(value, Mapping) else value
    if "base64" in item:
        return f"data:image/unknown;base64,{item['base64']}"
    raise InputError(f"image entry without an image: {sorted(item)}")


def _video_request(item: Mapping[str, Any]) -> dict[str, Any]:
    source = next((item[k] for k in ("video", "url", "path") if k in item), None)
    if source is None:
        raise InputError(f"video entry without a video: {sorted(item)}")
    num_frames = item.get("num_frames", item.get("nframes"))
    return {"video": source, "fps": item.get("fps"), "num_frames": num_frames}


def media_from_conversation(conversation: Sequence[Mapping[str, Any]]) -> tuple[list, list]:
    """The images and videos of a conversation in order. An entry is an image when its type is
    "image" or it has an "image"/"image_url" key, a video when its type is "video" or it has a
    "video" key (the chat templates' own test). Videos come back as dicts with the keys
    "video", "fps" and "num_frames"."""
    images, videos = [], []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for item in content:
            if not isinstance(item, Mapping):
                continue
            if item.get("type") == "image" or "image" in item or "image_url" in item:
                images.append(_image_source(item))
            elif item.get("type") == "video" or "video" in item:
                videos.append(_video_request(item))
    return images, videos


def _as_batch(messages: Sequence[Any]) -> tuple[list[Sequence[Mapping[str, Any]]], bool]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if isinstance(messages[0], Mapping):
        return [messages], False
    return [list(conversation) for conversation in messages], True


class Processor:
    """Chat template, tokenizer and image/video preprocessing of one checkpoint."""

    def __init__(
        self,
        *,
        family: str,
        tokenizer: TextTokenizer,
        chat_template: str | None,
        image_config: PixelConfig,
        video_config: VideoConfig,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        padding_side: str | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ConfigError(f"unsupported model family {family!r}; expected one of {FAMILIES}")
        self.family = family
        self.capabilities = capabilities(family)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_config = image_config
        self.video_config = video_config
        self.eos_token_ids = list(eos_token_ids)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side or tokenizer.padding_side
        # generation_config.json as read: `qwenvl_jax.generate` takes its sampling defaults here
        self.generation_config = dict(generation_config or {})
        ids = {}
        for token in (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN):
            ids[token] = tokenizer.token_to_id(token)
            if ids[token] is None:
                raise CheckpointError(f"the tokenizer has no {token} token")
        self.image_token_id = ids[IMAGE_TOKEN]
        self.video_token_id = ids[VIDEO_TOKEN]
        self.vision_start_token_id = ids[VISION_START_TOKEN]
        self.vision_end_token_id = ids[VISION_END_TOKEN]

    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str | None = None) -> Any:
        """The processor of a checkpoint folder (HF layout or `qwenvl-jax convert` output).

        Files read, each optional except tokenizer.json: config.json, tokenizer_config.json,
        processor_config.json, chat_template.json / chat_template.jinja, preprocessor_config.json,
        video_preprocessor_config.json, generation_config.json (kept as `generation_config`, the
        sampling defaults of `qwenvl_jax.generate`). For model_type "qwen" this returns a
        `qwenvl_jax.processing.qwen_vl_v1.QwenVLProcessor`, with `generation_config` too.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        family = family or detect_family(path)
        if family == "qwen":
            try:
                module = importlib.import_module("qwenvl_jax.processing.qwen_vl_v1")
            except ModuleNotFoundError as e:
                if e.name != "qwenvl_jax.processing.qwen_vl_v1":
                    raise
                raise ConfigError(
                    f"{path} is a Qwen-VL v1 checkpoint (model_type 'qwen'), whose processor "
                    "(qwenvl_jax.processing.qwen_vl_v1) is not available"
                ) from None
            processor = module.QwenVLProcessor.from_pretrained(path)
            processor.generation_config = read_json(path / "generation_config.json") or {}
            return processor
        if family in CAPABILITIES:  # a family processed by another's processor (Qwen3.5)
            family = CAPABILITIES[family].processor or family
        if family not in FAMILIES:
            raise ConfigError(
                f"{path}: unsupported model_type {family!r}; expected one of {FAMILIES}"
            )

        tokenizer = TextTokenizer.from_pretrained(path)
        processor_config = read_json(path / "processor_config.json") or {}
        image_dict = processor_config.get("image_processor") or read_json(
            path / "preprocessor_config.json"
        )
        if image_dict is None:
            logger.warning("%s has no preprocessor_config.json; using HF's default settings", path)
        video_dict = (
            processor_config.get("video_processor")
            or read_json(path / "video_preprocessor_config.json")
            or image_dict
        )
        generation_config = read_json(path / "generation_config.json") or {}
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = generation_config.get("pad_token_id")
        return cls(
            family=family,
            tokenizer=tokenizer,
            chat_template=_read_chat_template(path, processor_config),
            image_config=PixelConfig().updated(image_dict or {}),
            video_config=VideoConfig.defaults(family).updated(video_dict or {}),
            eos_token_ids=_eos_token_ids(path, tokenizer),
            pad_token_id=pad_token_id,
            generation_config=generation_config,
        )

    # ----------------------------------------------------------------------------- text

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str | list[str]:
        """The prompt text of one conversation (a list of texts for a list of conversations),
        with one `<|image_pad|>` / `<|video_pad|>` per image / video, not yet expanded.
        `template_kwargs` become template variables (e.g. `add_vision_id=True`)."""
        if self.chat_template is None:
            raise ConfigError("this checkpoint has no chat template")
        conversations, batched = _as_batch(messages)
        variables = {**self.tokenizer.special_tokens, **template_kwargs}
        texts = [
            render_chat_template(
                self.chat_template,
                conversation,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **variables,
            )
            for conversation in conversations
        ]
        return texts if batched else texts[0]

    def decode(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence `int[T]`."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Texts of id sequences `int[B, T]`."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- model inputs

    def __call__(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        padding_side: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> dict[str, Any]:
        """Model inputs for one conversation or a batch (a list of conversations).

        Messages use HF's chat format; image entries take a path, PIL image or `uint8[H, W, C]`
        array, video entries a path or a list of frames, with optional "fps" and "num_frames".
        See `process` for the returned dict.
        """
        conversations, _ = _as_batch(messages)
        texts = self.apply_chat_template(
            conversations,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **template_kwargs,
        )
        images, videos = [], []
        for conversation in conversations:
            conv_images, conv_videos = media_from_conversation(conversation)
            images += conv_images
            videos += conv_videos
        return self.process(texts, images=images, videos=videos, padding_side=padding_side)

    def process(
        self,
        texts: str | Sequence[str],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput | Mapping[str, Any]] | None = None,
        *,
        padding_side: str | None = None,
    ) -> dict[str, Any]:
        """Model inputs for rendered prompts holding one `<|image_pad|>` per image and one
        `<|video_pad|>` per video (images and videos listed in prompt order across the batch).

        Returns, as HF's processor with `return_tensors="np"` and `padding=True`:
        - `input_ids` int64[B, T], `attention_mask` int64[B, T] (padded on `padding_side`,
          default: tokenizer_config.json's, else right; use "left" for generation);
        - `mm_token_type_ids` int64[B, T]: 0 text, 1 image, 2 video token;
        - with images: `pixel_values` float32[N, C*tps*P*P], `image_grid_thw` int64[n_images, 3];
        - with videos: `pixel_values_videos` float32[M, C*tps*P*P], `video_grid_thw`
          int64[n_videos, 3], and for qwen2_5_vl `second_per_grid_ts`, a list of floats.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        images, videos = list(images or []), list(videos or [])
        for token, items, kind in (
            (IMAGE_TOKEN, images, "images"),
            (VIDEO_TOKEN, videos, "videos"),
        ):
            found = sum(t.count(token) for t in texts)
            if found != len(items):
                raise InputError(
                    f"the prompt has {found} {token} placeholders for {len(items)} {kind}"
                )

        out: dict[str, Any] = {}
        image_pads = []
        if images:
            out.update(preprocess_images(images, self.image_config))
            merge = self.image_config.merge_size**2
            image_pads = [IMAGE_TOKEN * (int(g.prod()) // merge) for g in out["image_grid_thw"]]
        video_pads = []
        if videos:
            video_features, video_pads = self._process_videos(videos)
            out.update(video_features)

        expanded = self._expand_placeholders(texts, image_pads, video_pads)
        out = {**self._tokenize(expanded, padding_side or self.padding_side), **out}
        return out

    def _process_videos(self, videos: list) -> tuple[dict[str, Any], list[str]]:
        """Video features, and the text each video's placeholder expands to."""
        cfg = self.video_config
        tps, merge = cfg.pixels.temporal_patch_size, cfg.pixels.merge_size**2
        patches, grids, seconds_per_grid, pads = [], [], [], []
        for video in videos:
            request = dict(video) if isinstance(video, Mapping) else {"video": video}
            frames = load_video(
                request["video"], cfg, fps=request.get("fps"), num_frames=request.get("num_frames")
            )
            p, grid = preprocess_video(frames, cfg)
            patches.append(p)
            grids.append(grid)
            seconds_per_grid.append(tps / frames.sampled_fps)
            pads.append(self._video_placeholder(frames, grid, merge))
        out = {
            "pixel_values_videos": np.concatenate(patches, axis=0),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        if self.capabilities.video_time == "seconds":
            out["second_per_grid_ts"] = seconds_per_grid
        return out, pads

    def _video_placeholder(
        self, frames: VideoFrames, grid: tuple[int, int, int], merge: int
    ) -> str:
        t, h, w = grid
        if self.capabilities.video_time != "timestamps":
            return VIDEO_TOKEN * (t * h * w // merge)
        # each temporal patch is its own "<t seconds>" + vision block (Qwen3-VL)
        tps = self.video_config.pixels.temporal_patch_size
        seconds = frame_timestamps(frames.indices, frames.fps, tps)
        frame = VISION_START_TOKEN + VIDEO_TOKEN * (h * w // merge) + VISION_END_TOKEN
        return "".join(f"<{seconds[i]:.1f} seconds>" + frame for i in range(t))

    @staticmethod
    def _expand_placeholders(
        texts: list[str], image_pads: list[str], video_pads: list[str]
    ) -> list[str]:
        replacements = {IMAGE_TOKEN: iter(image_pads), VIDEO_TOKEN: iter(video_pads)}
        pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
        return [pattern.sub(lambda m: next(replacements[m.group(0)]), t) for t in texts]

    def _tokenize(self, texts: list[str], padding_side: str) -> dict[str, np.ndarray]:
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = self.tokenizer.encode_batch(texts)
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, row in enumerate(rows):
            span = (
                slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            )
            input_ids[b, span] = row
            attention_mask[b, span] = 1
        mm_token_type_ids = np.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        mm_token_type_ids[input_ids == self.video_token_id] = 2
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
        }
