"""One conversation to one training example: media loaded and preprocessed, the chat template
rendered and tokenized, a loss mask on the assistant tokens, and the sample's own positions.

Everything that the inference processor does is done by it (its chat template, tokenizer, image
and video preprocessing: `Processor.apply_chat_template` and `Processor.process`), so training
sees exactly the inputs that inference builds. On top of it:

- Assistant spans: for each assistant message i, the conversation rendered up to message i with
  the generation prompt, and up to message i+1 without it, give the character span of the reply:
  from the end of the generation prompt through the end-of-turn marker, trailing whitespace
  excluded. Templates that rewrite earlier turns (Qwen3 Thinking drops old reasoning) fail that
  prefix test for those turns; their replies are then found by the ChatML markers
  `<|im_start|>assistant\\n ... <|im_end|>` in the full rendering.
- Tokenization segment by segment (prompt parts and replies, in order): a reply's tokens are then
  exactly those a model would generate after that prompt, tokenized as at inference.
- Grounding: `{"type": "box", "label": ..., "box": [x1, y1, x2, y2]}` content entries (pixels
  of the latest image, or of `image_index`) become text with `qwenvl_jax.grounding.format_box`,
  in the family's own convention (Qwen-VL `<ref>/<box>` 0-1000, Qwen2.5-VL absolute pixels,
  Qwen3-VL 0-1000 relative).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.data.sources import Blob, RawRecord, image_input, malformed, record_messages
from qwenvl_jax.data.stats import NO_TARGET, TOO_LONG, SampleError
from qwenvl_jax.grounding import format_box, in_input_pixels
from qwenvl_jax.models.mrope import get_rope_index
from qwenvl_jax.processing.image import load_image, smart_resize

LOSS_ON = ("assistant", "all")
_CHATML_REPLY = "<|im_start|>assistant\n"
_CHATML_END = "<|im_end|>"


@dataclasses.dataclass
class Example:
    """One tokenized sample. input_ids int32[n]; target_mask uint8[n] (1 where the token is one
    the model should learn to predict); position_ids int32[3, n]; Qwen2/2.5/3-VL: pixel_values
    float32[p, patch_dim] with image_grid_thw int64[k, 3], pixel_values_videos float32[q,
    patch_dim] with video_grid_thw int64[m, 3]; Qwen-VL v1: pixel_values float32[k, 3, 448, 448]."""

    input_ids: np.ndarray
    target_mask: np.ndarray
    position_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_patches(self) -> int:
        """ViT patches of the native-resolution families (0 for Qwen-VL v1)."""
        if self.image_grid_thw is None and self.video_grid_thw is None:
            return 0
        return sum(
            0 if a is None else len(a) for a in (self.pixel_values, self.pixel_values_videos)
        )

    @property
    def num_images(self) -> int:
        """Images of a Qwen-VL v1 example (fixed 448 px inputs)."""
        if self.image_grid_thw is not None or self.pixel_values is None:
            return 0
        return len(self.pixel_values)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What the pipeline carries in place of a bad sample, so the packer can count it."""

    reason: str
    where: str
    message: str


class SampleTransform:
    """Record or messages -> Example with a checkpoint's processor.

    loss_on: "assistant" (the replies and their end-of-turn markers) or "all" (every token
    except the image/video placeholders). max_tokens / max_patches / max_images: larger samples
    raise SampleError(too_long); a text too long for max_tokens by its size alone (no token
    stands for more bytes than the longest one of the vocabulary) is refused before it is
    tokenized. Every bad sample raises a SampleError or an InputError.
    """

    def __init__(
        self,
        processor: Any,
        model_config: ModelConfig,
        *,
        loss_on: str = "assistant",
        max_tokens: int | None = None,
        max_patches: int | None = None,
        max_images: int | None = None,
    ) -> None:
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        self.processor = processor
        self.config = model_config
        self.family = model_config.family
        self.loss_on = loss_on
        self.max_tokens = max_tokens
        self.max_patches = max_patches
        self.max_images = max_images
        self._token_bytes: int | None = None

    def __call__(self, record: RawRecord) -> Example:
        return self.example(record_messages(record))

    def example(self, messages: list[dict[str, Any]]) -> Example:
        messages = self.format_boxes(messages)
        if self.config.capabilities.fixed_size_images:
            return self._v1_example(messages)
        with _processor_media(messages) as ready:
            texts, is_reply = self.segments(ready)
            images, videos = _media(ready)
            out = self.processor.process(texts, images=images, videos=videos, padding_side="right")
        ids, replies = [], []
        for row, valid, reply in zip(out["input_ids"], out["attention_mask"], is_reply):
            tokens = np.asarray(row)[np.asarray(valid) == 1]
            ids.append(tokens)
            replies.append(np.full(len(tokens), reply))
        input_ids = np.concatenate(ids).astype(np.int32)
        reply = np.concatenate(replies)
        vision = np.isin(input_ids, [self.config.image_token_id, self.config.video_token_id])
        example = Example(
            input_ids, self._target_mask(reply, vision), self._positions(input_ids, out)
        )
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if out.get(key) is not None:
                setattr(example, key, np.asarray(out[key]))
        self._check_size(example)
        return example

    def _target_mask(self, reply: np.ndarray, vision: np.ndarray) -> np.ndarray:
        """uint8[n]: the tokens that count as targets (replies, or all but vision positions)."""
        mask = ~vision if self.loss_on == "all" else reply
        if not mask[1:].any():
            raise SampleError(NO_TARGET, "no token to learn (empty replies?)")
        return mask.astype(np.uint8)

    def _v1_example(self, messages: list[dict[str, Any]]) -> Example:
        """Qwen-VL v1: its processor builds the ids (make_context's ChatML, role and content
        tokenized apart), so replies are found at the id level with the same prefix test.
        Images are rendered with stand-in arrays (named `imageN.png` in the prompt): the model
        overwrites the 256 positions after each `<img>`, so the name there never matters, and
        the prefix renders need no image work; the real images are preprocessed once."""
        from qwenvl_jax.processing.qwen_vl_v1 import preprocess_image

        images, videos = _media(messages)
        if videos:
            raise malformed("Qwen-VL v1 does not take videos")
        self._check_text_length(
            "".join(_text_of(m["content"]) for m in messages if m["role"] != "system")
        )
        stand_in = _replace_images(messages, np.zeros((1, 1, 3), np.uint8))

        def ids_of(conversation: list[dict[str, Any]], generation_prompt: bool) -> np.ndarray:
            return np.asarray(self.processor.prompt_ids(conversation, generation_prompt), np.int64)

        input_ids = ids_of(stand_in, False)
        reply = np.zeros(len(input_ids), bool)
        for i, message in enumerate(stand_in):
            if message["role"] != "assistant":
                continue
            before = ids_of(stand_in[:i], True) if i else input_ids[:0]
            through = ids_of(stand_in[: i + 1], False)
            if not (i and _starts_with(through, before) and _starts_with(input_ids, through)):
                raise malformed(f"cannot find reply {i} of the conversation in its prompt ids")
            reply[len(before) : len(through)] = True
        start_id = self.config.vision.image_start_id
        inside = np.cumsum(input_ids == start_id) - np.cumsum(input_ids == start_id + 1)
        vision = (inside > 0) & (input_ids != start_id)  # the 256 positions after each <img>
        n = len(input_ids)
        example = Example(
            input_ids.astype(np.int32),
            self._target_mask(reply, vision),
            np.broadcast_to(np.arange(n, dtype=np.int32), (3, n)).copy(),
        )
        if images:
            size = self.config.vision.image_size
            example.pixel_values = np.stack(
                [preprocess_image(image_input(im), size) for im in images]
            )
        self._check_size(example)
        return example

    # ------------------------------------------------------------------------- pieces

    def segments(self, messages: list[dict[str, Any]]) -> tuple[list[str], list[bool]]:
        """The rendered conversation cut into non-empty texts, and whether each is a reply."""
        full = self._render(messages, False)
        self._check_text_length(full)
        cuts = [0]
        for start, end in assistant_spans(self._render, messages, full):
            if start < cuts[-1]:
                raise malformed("assistant turns overlap in the rendered conversation")
            cuts += [start, end]
        cuts.append(len(full))
        texts, is_reply = [], []
        for k in range(len(cuts) - 1):
            piece = full[cuts[k] : cuts[k + 1]]
            if piece:
                texts.append(piece)
                is_reply.append(k % 2 == 1)
        return texts, is_reply

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )

    def format_boxes(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Box entries replaced by their text in this family's grounding format."""
        if not any(
            isinstance(m["content"], list) and any(i.get("type") == "box" for i in m["content"])
            for m in messages
        ):
            return messages

        sizes: list[tuple[int, int]] = []
        out = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, list):
                out.append(message)
                continue
            items = []
            for item in content:
                if item.get("type") == "image":
                    rgb = load_image(image_input(item["image"]))
                    sizes.append((rgb.shape[1], rgb.shape[0]))
                if item.get("type") != "box":
                    items.append(item)
                    continue
                k = item.get("image_index", len(sizes) - 1)
                if not 0 <= k < len(sizes):
                    raise malformed(f"a box refers to image {k}, and {len(sizes)} come before it")
                text = format_box(
                    item["label"],
                    item["box"],
                    self.family,
                    sizes[k],
                    input_size=self._input_size(sizes[k]),
                )
                items.append({"type": "text", "text": text})
            out.append({**message, "content": _merge_text(items)})
        return out

    def _input_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """(width, height) the processor resizes an image of `size` to, for a family whose box
        coordinates are pixels of that image (Qwen2.5-VL); None for the other families."""
        if not in_input_pixels(self.family):
            return None
        cfg = self.processor.image_config
        h, w = smart_resize(size[1], size[0], cfg.factor, cfg.min_pixels, cfg.max_pixels)
        return w, h

    def _positions(self, input_ids: np.ndarray, out: dict[str, Any]) -> np.ndarray:
        """int32[3, n]: the sample's own M-RoPE positions."""
        spg = out.get("second_per_grid_ts")
        pos, _ = get_rope_index(
            self.config,
            input_ids[None],
            None,
            out.get("image_grid_thw"),
            out.get("video_grid_thw"),
            None if spg is None else np.asarray(spg, np.float32),
        )
        return pos[:, 0].astype(np.int32)

    def _check_text_length(self, text: str) -> None:
        """Raise SampleError(too_long) when `text` alone must give more than max_tokens tokens:
        its UTF-8 size after NFC normalisation (what the tokenizers see) over the size of the
        longest token. Cheap for texts that cannot be too long; nothing is tokenized."""
        limit = self.max_tokens
        if limit is None or 4 * len(text) <= limit:  # every token is at least one byte
            return
        size = len(unicodedata.normalize("NFC", text).encode("utf-8"))
        if size <= limit:
            return
        if self._token_bytes is None:
            vocab = range(self.processor.tokenizer.vocab_size)
            pieces = self.processor.batch_decode([[i] for i in vocab], skip_special_tokens=False)
            self._token_bytes = max(1, *(len(piece.encode("utf-8")) for piece in pieces))
        least = math.ceil(size / self._token_bytes)
        if least > limit:
            raise SampleError(
                TOO_LONG,
                f"{size} bytes of text, so at least {least} tokens, more than the limit of {limit}",
            )

    def _check_size(self, example: Example) -> None:
        limits = (
            ("tokens", example.num_tokens, self.max_tokens),
            ("vision patches", example.num_patches, self.max_patches),
            ("images", example.num_images, self.max_images),
        )
        for what, n, limit in limits:
            if limit is not None and n > limit:
                raise SampleError(TOO_LONG, f"{n} {what}, more than the {limit} a batch holds")


def assistant_spans(
    render: Any, messages: Sequence[dict[str, Any]], full: str
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply in `full` (the rendering of the
    whole conversation); see the module docstring."""
    spans: list[tuple[int, int]] = []
    replies = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = None
        if i > 0:
            before = render(list(messages[:i]), True)
            through = render(list(messages[: i + 1]), False)
            end = len(through.rstrip())
            if full.startswith(through) and through.startswith(before) and end >= len(before):
                span = (len(before), end)
        spans.append(span or _chatml_span(full, replies))
        replies += 1
    return spans


def _chatml_span(full: str, k: int) -> tuple[int, int]:
    """The k-th `<|im_start|>assistant\\n ... <|im_end|>` reply of a ChatML rendering."""
    start = -1
    for _ in range(k + 1):
        start = full.find(_CHATML_REPLY, start + 1)
        if start < 0:
            raise malformed(f"cannot find assistant reply {k + 1} in the rendered conversation")
    start += len(_CHATML_REPLY)
    end = full.find(_CHATML_END, start)
    if end < 0:
        raise malformed(f"assistant reply {k + 1} has no {_CHATML_END}")
    return start, end + len(_CHATML_END)


def _starts_with(ids: np.ndarray, prefix: np.ndarray) -> bool:
    return len(prefix) <= len(ids) and bool(np.array_equal(ids[: len(prefix)], prefix))


def _replace_images(messages: list[dict[str, Any]], stand_in: Any) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {**item, "image": stand_in} if item.get("type") == "image" else item
                for item in content
            ]
        out.append({**message, "content": content})
    return out


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or its text entries joined."""
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


def _merge_text(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text entries joined (box text usually sits inside a sentence)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if out and item.get("type") == "text" and out[-1].get("type") == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + item["text"]}
        else:
            out.append(item)
    return out


def _media(messages: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Images and videos in conversation order, as the processor's `process` takes them."""
    images, videos = [], []
    for message in messages:
        content = message["content"]
        for item in content if isinstance(content, list) else []:
            if item.get("type") == "image":
                images.append(item["image"])
            elif item.get("type") == "video":
                videos.append(
                    {
                        "video": item["video"],
                        "fps": item.get("fps"),
                        "num_frames": item.get("num_frames", item.get("nframes")),
                    }
                )
    return images, videos


@contextlib.contextmanager
def _processor_media(messages: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Messages whose media the processor can open: Blob images as data URIs, Blob videos as
    temporary files (removed on exit), frame lists with each frame resolved."""
    temp: list[str] = []

    def ready(kind: str, source: Any) -> Any:
        if kind == "image":
            return image_input(source)
        if isinstance(source, list):
            return [image_input(frame) for frame in source]
        if isinstance(source, Blob):
            fd, path = tempfile.mkstemp(suffix=Path(source.name).suffix or ".mp4")
            with os.fdopen(fd, "wb") as f:
                f.write(source.data)
            temp.append(path)
            return path
        return source

    try:
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                content = [
                    {**item, item["type"]: ready(item["type"], item[item["type"]])}
                    if item.get("type") in ("image", "video")
                    else item
                    for item in content
                ]
            out.append({**message, "content": content})
        yield out
    finally:
        for path in temp:
            with contextlib.suppress(OSError):
                os.remove(path)
