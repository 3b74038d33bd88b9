"""Where training samples come from, and how each record becomes HF-format chat messages.

Sources are random-access sequences (`len`, `[i]`) that Grain reads: a JSONL file, the ArrayRecord
shards written by `qwenvl-jax data`, or a TFDS dataset through `tfds.data_source` (ArrayRecord
files, no TensorFlow). An element is a `RawRecord`; `record_messages` parses it, so a malformed
record is a counted bad sample, not a crash.

Record forms (one JSON object per JSONL line; a TFDS example holds the same fields):

- HF chat: `{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
  {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`. Media entries
  may leave out their source and take it, in order, from a top-level `"images"` / `"videos"` list;
  string contents may hold `<image>` / `<video>` tags that those lists fill.
- LLaVA / ShareGPT: `{"conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}], "image": "a.png"}` (`"images"`, `"video"`, `"videos"` too;
  roles human/user, gpt/assistant, system; an optional top-level `"system"` text). Media with no
  tag go in front of the first user turn.
- Video entries: `{"type": "video", "video": "clip.mp4", "fps": 2.0, "num_frames": 8}` (both
  optional), or a list of frame paths.
- Grounding: a content entry `{"type": "box", "label": "the cat", "box": [x1, y1, x2, y2]}`, the
  box in pixels of the conversation's latest image before it (or of image number `"image_index"`,
  0-based). It is written out per family at training time (see transforms.py).

Media paths are relative to the JSONL file's folder (`qwenvl-jax data` embeds only media files
inside that folder or a `--media-root`, see arrayrecord.check_media_roots). In a TFDS example,
images may be encoded bytes or `uint8[H, W, 3]` arrays and videos `uint8[T, H, W, 3]` arrays.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qwenvl_jax.data.stats import MALFORMED, SampleError
from qwenvl_jax.errors import InputError

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
}
_TAG = re.compile(r"<(image|video)>")
_MEDIA_KINDS = ("image", "video")
_SOURCE_KEYS = {"image": ("image", "image_url", "path", "url"), "video": ("video", "path", "url")}


@dataclasses.dataclass(frozen=True)
class Blob:
    """Media bytes carried inside a record (ArrayRecord shards, TFDS); `name` keeps the file
    name's suffix, which says the container format."""

    name: str
    data: bytes


class RawRecord(NamedTuple):
    """One element of a source. kind: "json" (payload: a JSON text, base_dir: the folder media
    paths are relative to), "arrayrecord" (payload: bytes of one shard record) or "tfds" (payload:
    one example dict)."""

    kind: str
    payload: Any
    base_dir: str = ""
    key: str = ""


def malformed(message: str) -> SampleError:
    return SampleError(MALFORMED, message)


def image_input(source: Any) -> Any:
    """An image source as `processing.image.load_image` takes it: a Blob becomes a base64 data
    URI (so it is decoded, EXIF-rotated and converted exactly like a file); others pass."""
    if isinstance(source, Blob):
        encoded = base64.b64encode(source.data).decode("ascii")
        return f"data:image/{Path(source.name).suffix.lstrip('.') or 'unknown'};base64,{encoded}"
    return source


# ------------------------------------------------------------------------------ record parsing


def record_messages(record: RawRecord) -> list[dict[str, Any]]:
    """The HF-format messages of a record; media sources are absolute paths, `Blob`s or arrays.
    Raises SampleError for a malformed record."""
    if record.kind == "arrayrecord":
        from qwenvl_jax.data.arrayrecord import decode_record

        return decode_record(record.payload)
    if record.kind == "json":
        try:
            obj = json.loads(record.payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise malformed(f"not valid JSON: {e}") from None
        return parse_sample(obj, record.base_dir)
    if record.kind == "tfds":
        return parse_sample(_tfds_fields(record.payload), record.base_dir)
    raise ValueError(f"unknown record kind {record.kind!r}")


def parse_sample(obj: Any, base_dir: str | os.PathLike = "") -> list[dict[str, Any]]:
    """Messages of one record in either accepted form (see the module docstring)."""
    if not isinstance(obj, Mapping):
        raise malformed(f"a sample must be a JSON object, got {type(obj).__name__}")
    media = {kind: _media_list(obj, kind, base_dir) for kind in _MEDIA_KINDS}
    if "messages" in obj:
        messages = _hf_messages(obj["messages"], base_dir, media)
    elif "conversations" in obj:
        messages = _sharegpt_messages(obj["conversations"], media)
        if isinstance(obj.get("system"), str) and obj["system"]:
            messages.insert(0, {"role": "system", "content": obj["system"]})
    else:
        raise malformed(f"a sample needs 'messages' or 'conversations', got keys {sorted(obj)}")
    for kind, left in media.items():
        if left:
            raise malformed(f"{len(left)} {kind}(s) listed but not placed in the conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise malformed("the conversation has no assistant turn")
    return messages


def _media_list(obj: Mapping[str, Any], kind: str, base_dir: str | os.PathLike) -> list[Any]:
    """The record-level media of one kind, resolved: "image" (a path or a list of paths),
    "video" (a path, or a list of frame paths: one video), "images" / "videos" (lists)."""
    items: list[Any] = []
    for key in (kind, kind + "s"):
        value = obj.get(key)
        if value is None:
            continue
        if key == "video" or not isinstance(value, (list, tuple)):
            value = [value]
        items += [resolve_media(v, base_dir, kind) for v in value]
    return items


def resolve_media(source: Any, base_dir: str | os.PathLike, kind: str) -> Any:
    """A media source made usable anywhere: relative paths joined to `base_dir`, bytes wrapped
    in a Blob; URLs, data URIs, arrays, Blobs and lists of frames pass through."""
    if isinstance(source, bytes):
        return Blob(f"{kind}.bin", source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if not source:
            raise malformed(f"empty {kind} path")
        if source.startswith(("http://", "https://", "data:", "file://")) or os.path.isabs(source):
            return source
        return os.path.join(os.fspath(base_dir), source) if base_dir else source
    if isinstance(source, (Blob, np.ndarray)):
        return source
    if kind == "video" and isinstance(source, list) and source:
        return [resolve_media(frame, base_dir, "image") for frame in source]
    raise malformed(f"unsupported {kind} source of type {type(source).__name__}")


def _take(media: dict[str, list[Any]], kind: str) -> Any:
    if not media[kind]:
        raise malformed(f"more <{kind}> entries than {kind}s listed in the sample")
    return media[kind].pop(0)


def _split_tags(text: str, media: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Text with <image>/<video> tags as content entries, the tags filled from `media`."""
    entries: list[dict[str, Any]] = []
    pos = 0
    for m in _TAG.finditer(text):
        if text[pos : m.start()]:
            entries.append({"type": "text", "text": text[pos : m.start()]})
        kind = m.group(1)
        entries.append({"type": kind, kind: _take(media, kind)})
        pos = m.end()
    if text[pos:]:
        entries.append({"type": "text", "text": text[pos:]})
    return entries


def _role(message: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        if key in message:
            role = ROLES.get(str(message[key]).lower())
            if role is None:
                raise malformed(f"unknown role {message[key]!r}")
            return role
    raise malformed(f"a turn without a role: keys {sorted(message)}")


def _hf_messages(raw: Any, base_dir: str | os.PathLike, media: dict[str, list[Any]]) -> list:
    if not isinstance(raw, list) or not raw:
        raise malformed("'messages' must be a non-empty list")
    messages = []
    for message in raw:
        if not isinstance(message, Mapping):
            raise malformed(f"a message must be an object, got {type(message).__name__}")
        role = _role(message, "role")
        content = message.get("content")
        if isinstance(content, str):
            has_media = any(media.values())
            content = _split_tags(content, media) if has_media and _TAG.search(content) else content
        elif isinstance(content, list):
            content = [_content_entry(item, base_dir, media) for item in content]
        elif content is None and role == "assistant":
            content = ""
        else:
            raise malformed(f"message content must be a string or a list, got {content!r:.60}")
        out = {**message, "role": role, "content": content}
        messages.append(out)
    return messages


def _content_entry(item: Any, base_dir: str | os.PathLike, media: dict[str, list[Any]]) -> dict:
    if isinstance(item, str):
        return {"type": "text", "text": item}
    if not isinstance(item, Mapping):
        raise malformed(f"a content entry must be an object, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "box" or "box" in item:
        return _box_entry(item)
    media_kind = _media_kind(item)
    if media_kind is not None:
        keys = _SOURCE_KEYS[media_kind]
        source = next((item[k] for k in keys if item.get(k) is not None), None)
        if isinstance(source, Mapping):  # {"image_url": {"url": ...}}
            source = source.get("url")
        if source is None:  # the source comes from the record's "images" / "videos" list
            source = _take(media, media_kind)
        else:
            source = resolve_media(source, base_dir, media_kind)
        rest = {k: v for k, v in item.items() if k not in keys}
        return {**rest, "type": media_kind, media_kind: source}
    if kind in (None, "text") and isinstance(item.get("text"), str):
        return {"type": "text", "text": item["text"]}
    raise malformed(f"unsupported content entry {dict(item)!r:.80}")


def _media_kind(item: Mapping[str, Any]) -> str | None:
    """ "image" / "video" for a media entry, by the chat templates' own test, else None."""
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    return None


def _box_entry(item: Mapping[str, Any]) -> dict[str, Any]:
    box = item.get("box")
    if not (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise malformed(f"a box must be [x1, y1, x2, y2] in pixels, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 <= x2 and y1 <= y2 and min(x1, y1) >= 0):
        raise malformed(f"a box must have 0 <= x1 <= x2 and 0 <= y1 <= y2, got {list(box)}")
    label = item.get("label", "")
    if not isinstance(label, str):
        raise malformed(f"a box label must be a string, got {label!r}")
    out = {"type": "box", "label": label, "box": [x1, y1, x2, y2]}
    if item.get("image_index") is not None:
        out["image_index"] = int(item["image_index"])
    return out


def _sharegpt_messages(raw: Any, media: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise malformed("'conversations' must be a non-empty list")
    tagged = any(
        isinstance(t, Mapping)
        and isinstance(t.get("value", t.get("content")), str)
        and _TAG.search(t.get("value", t.get("content")))
        for t in raw
    )
    messages = []
    for turn in raw:
        if not isinstance(turn, Mapping):
            raise malformed(f"a turn must be an object, got {type(turn).__name__}")
        role = _role(turn, "from", "role")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise malformed(f"a turn's 'value' must be a string, got {text!r:.60}")
        if tagged and _TAG.search(text):
            content: Any = _split_tags(text, media)
        elif role == "user" and any(media.values()):
            # LLaVA convention: untagged media open the first user turn
            content = [{"type": k, k: v} for k in _MEDIA_KINDS for v in media[k]]
            content.append({"type": "text", "text": text})
            media["image"], media["video"] = [], []
        else:
            content = text
        messages.append({"role": role, "content": content})
    return messages


def _tfds_fields(example: Mapping[str, Any]) -> dict[str, Any]:
    """A TFDS example as a record: text fields decoded, JSON conversation fields parsed, encoded
    media bytes kept as Blobs and decoded arrays as arrays."""
    out: dict[str, Any] = {}
    for key, value in example.items():
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = list(value)
        if key in ("messages", "conversations"):
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise malformed(f"'{key}' is not valid JSON: {e}") from None
        elif key == "system" and isinstance(value, bytes):
            value = value.decode("utf-8")
        elif key in ("image", "images", "video", "videos"):
            kind = key.rstrip("s")
            if isinstance(value, list):
                value = [Blob(f"{kind}.bin", v) if isinstance(v, bytes) else v for v in value]
            elif (
                isinstance(value, np.ndarray)
                and key.endswith("s")
                and value.dtype == np.uint8
                and value.ndim == (4 if kind == "image" else 5)
            ):
                value = list(value)
        out[key] = value
    return out


# ------------------------------------------------------------------------------ sources


class JsonlSource:
    """Random access to the records of a JSONL file (blank lines are not records). Line offsets
    are found once; reads use `os.pread`, so threads can share the file, and each process
    opens it itself on first read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise InputError(f"data file not found: {path}")
        spans, pos = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    spans.append((pos, len(line)))
                pos += len(line)
        self._spans = np.asarray(spans, np.int64).reshape(-1, 2)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> RawRecord:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, size = (int(v) for v in self._spans[index])
        line = os.pread(self._fd, size, start)
        return RawRecord(
            "json",
            line.decode("utf-8", errors="replace"),
            str(self.path.parent),
            f"{self.path.name}:{index + 1}",
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, {len(self)} records)"


class ArrayRecordSource:
    """The records of ArrayRecord shards (one sample each, media embedded; see arrayrecord.py)."""

    def __init__(
        self, paths: Sequence[str | os.PathLike], metadata: Mapping[str, Any] | None = None
    ) -> None:
        import grain

        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise InputError("no .array_record files given")
        self.metadata = dict(metadata or {})
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord("arrayrecord", self._source[index], "", f"record:{index}")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


class TfdsSource:
    """A TFDS dataset read with `tfds.data_source` (prepared in the ArrayRecord file format)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None) -> None:
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # tfds raises many kinds for a missing or unprepared dataset
            raise InputError(f"cannot open TFDS dataset {name!r} split {split!r}: {e}") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord("tfds", dict(self._source[index]), "", f"{self.name}:{index}")

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} records)"


def open_source(spec: str | os.PathLike, *, tfds_data_dir: str | None = None) -> Any:
    """The source a `data.train` value names: `tfds:NAME[:SPLIT]`, a `qwenvl-jax data` output
    folder (or one .array_record file), or a JSONL file."""
    text = os.fspath(spec)
    if text.startswith("tfds:"):
        name, _, split = text[len("tfds:") :].partition(":")
        return TfdsSource(name, split or "train", tfds_data_dir)
    path = Path(text)
    if path.is_dir():
        shards = sorted(path.glob("*.array_record"))
        if not shards:
            raise InputError(f"{path}: no .array_record shards in this folder")
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except (OSError, json.JSONDecodeError):
            metadata = {}
        return ArrayRecordSource(shards, metadata)
    if path.suffix == ".array_record":
        if not path.is_file():
            raise InputError(f"data file not found: {path}")
        return ArrayRecordSource([path])
    return JsonlSource(path)
