"""ArrayRecord shards of training samples: the output of `qwenvl-jax data`, read by `train`.

One record per sample, self-contained (the media bytes are inside), so shards can be copied
anywhere and read with fast random access:

    b"QVJ1" | uint32 little-endian n | n bytes of JSON header | media bytes, back to back

The header is `{"messages": [...], "blobs": [{"name": "a.png", "size": 1234}, ...],
"meta": {...}}`: the HF-format messages (sources.py) with each media source replaced by
`{"blob": k}` (a video given as frames: a list of those). A folder of shards also holds
`metadata.json` (`{"format", "samples", "skipped", "shards": [{"file", "records"}], "family",
"model"}`), written last: folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

from qwenvl_jax.data.sources import Blob, JsonlSource, image_input, malformed, record_messages
from qwenvl_jax.data.stats import (
    CORRUPT_MEDIA,
    MEDIA_OUTSIDE_ROOT,
    DataStats,
    SampleError,
    SkipPolicy,
)
from qwenvl_jax.errors import InputError
from qwenvl_jax.processing.image import MissingMediaError, load_image
from qwenvl_jax.processing.video import open_video

logger = logging.getLogger(__name__)

MAGIC = b"QVJ1"
FORMAT = "qwenvl_jax.data/1"
METADATA = "metadata.json"
MEDIA_KEYS = ("image", "video")


# ------------------------------------------------------------------------------ record format


def _read_media(source: Any) -> Blob:
    """A media source as bytes: a Blob as is, a local file read."""
    if isinstance(source, Blob):
        return source
    if isinstance(source, str) and not source.startswith(("http://", "https://", "data:")):
        path = source[len("file://") :] if source.startswith("file://") else source
        if not os.path.isfile(path):
            raise MissingMediaError(f"media file not found: {path}")
        return Blob(os.path.basename(path), Path(path).read_bytes())
    what = source if isinstance(source, str) else type(source).__name__
    raise malformed(f"cannot embed media {what!s:.80} (only local files and bytes)")


def encode_record(messages: list[dict[str, Any]], meta: Mapping[str, Any] | None = None) -> bytes:
    """One sample as a self-contained record; local media files are read into it."""
    blobs: list[Blob] = []

    def embed(source: Any) -> Any:
        if isinstance(source, list):  # a video as frames
            return [embed(frame) for frame in source]
        if isinstance(source, str) and source.startswith("data:"):
            return source
        blobs.append(_read_media(source))
        return {"blob": len(blobs) - 1}

    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {**item, item["type"]: embed(item[item["type"]])}
                if item.get("type") in MEDIA_KEYS
                else item
                for item in content
            ]
        out.append({**message, "content": content})
    header = json.dumps(
        {
            "messages": out,
            "blobs": [{"name": b.name, "size": len(b.data)} for b in blobs],
            "meta": dict(meta or {}),
        },
        ensure_ascii=False,
    ).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *(b.data for b in blobs)])


def decode_record(data: bytes) -> list[dict[str, Any]]:
    """The messages of a record, media as Blobs. Raises SampleError when it is not one."""
    return _decode(data)[0]


def record_meta(data: bytes) -> dict[str, Any]:
    """The `meta` dict a record was written with."""
    return _decode(data)[1]


def _decode(data: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if len(data) < 8 or data[:4] != MAGIC:
        raise malformed("not a qwenvl_jax data record")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise malformed(f"corrupt record header: {e}") from None
    blobs, pos = [], 8 + n
    for spec in header["blobs"]:
        blobs.append(Blob(spec["name"], data[pos : pos + spec["size"]]))
        pos += spec["size"]
    if pos != len(data):
        raise malformed(f"corrupt record: {len(data)} bytes, the header describes {pos}")

    def restore(source: Any) -> Any:
        if isinstance(source, list):
            return [restore(frame) for frame in source]
        return blobs[source["blob"]] if isinstance(source, dict) else source

    messages = []
    for message in header["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {**item, item["type"]: restore(item[item["type"]])}
                if item.get("type") in MEDIA_KEYS
                else item
                for item in content
            ]
        messages.append({**message, "content": content})
    return messages, header.get("meta", {})


# ------------------------------------------------------------------------------ validation


def _media_sources(messages: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    """(kind, source) of every medium in the messages; a video given as frames gives one
    ("image", frame) per frame."""
    for message in messages:
        content = message["content"]
        for item in content if isinstance(content, list) else []:
            kind = item.get("type")
            if kind not in MEDIA_KEYS:
                continue
            if isinstance(item[kind], list):
                yield from (("image", frame) for frame in item[kind])
            else:
                yield kind, item[kind]


def check_media(messages: list[dict[str, Any]]) -> None:
    """Decode every image, and open every video and decode its first frame, so that missing or
    corrupt media are found at conversion time. Raises SampleError / MissingMediaError."""
    for kind, source in _media_sources(messages):
        if kind == "image":
            load_image(image_input(source))
        else:
            _probe_video(source)


def check_media_roots(messages: list[dict[str, Any]], roots: Sequence[Path]) -> None:
    """Raise SampleError(media_outside_root) for a local media file that does not lie inside one
    of the `roots` folders once symbolic links and `..` are resolved (the roots resolved too)."""
    for kind, source in _media_sources(messages):
        if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
            continue
        path = source[len("file://") :] if source.startswith("file://") else source
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in roots):
            where = " or ".join(str(root) for root in roots)
            raise SampleError(
                MEDIA_OUTSIDE_ROOT, f"{kind} {path} lies outside the media folder {where}"
            )


def _probe_video(source: Any) -> None:
    if isinstance(source, np.ndarray):
        return
    if isinstance(source, Blob):
        target: Any = io.BytesIO(source.data)
        name = source.name
    else:
        name = source[len("file://") :] if source.startswith("file://") else source
        if not os.path.isfile(name):
            raise MissingMediaError(f"video file not found: {name}")
        target = name
    with open_video(target, name) as container:
        try:
            next(container.decode(container.streams.video[0]))
        except (av.FFmpegError, OSError, ValueError, StopIteration) as e:
            raise SampleError(CORRUPT_MEDIA, f"cannot read video {name}: {e}") from None


# ------------------------------------------------------------------------------ writing


class NoSamplesError(InputError):
    """Not one sample of a conversion could be written; `stats` says why."""

    def __init__(self, message: str, stats: DataStats) -> None:
        super().__init__(message)
        self.stats = stats


class ShardWriter:
    """Writes records into `folder/data-NNNNN.array_record`, `records_per_shard` per file."""

    def __init__(self, folder: Path, records_per_shard: int = 1000) -> None:
        if records_per_shard < 1:
            raise InputError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.folder = Path(folder)
        self.records_per_shard = records_per_shard
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"data-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.shards.append({"file": name, "records": 0})
        self._writer.write(record)
        self.shards[-1]["records"] += 1
        if self.shards[-1]["records"] >= self.records_per_shard:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def convert_jsonl(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    check: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None = None,
    records_per_shard: int = 1000,
    strict: bool = False,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    media_roots: Sequence[str | os.PathLike] = (),
) -> DataStats:
    """Convert a JSONL file of conversations into ArrayRecord shards at `dst`.

    Each line is parsed, its local media files must lie inside the JSONL file's folder or one of
    `media_roots` (`check_media_roots`), they are decoded once (`check_media`) and, when `check`
    is given (e.g. a checkpoint's full transform), `check(messages)` runs and its dict is stored
    as the record's meta. Bad lines are counted and skipped (an error when `strict`). Nothing is
    left at `dst` when no sample could be written. Returns the counts (`samples` = records
    written).
    """
    from qwenvl_jax.loading.writer import atomic_dir

    source = JsonlSource(src)
    roots = [source.path.parent]
    for root in media_roots:
        if not os.path.isdir(root):
            raise InputError(f"media root not found: {root}")
        roots.append(Path(os.path.realpath(root)))
    stats = DataStats()
    policy = SkipPolicy(strict)
    indices: Iterable[int] = range(len(source))
    if progress is not None:
        indices = progress(indices)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, records_per_shard)
        for i in indices:
            record = source[i]
            try:
                messages = record_messages(record)
                check_media_roots(messages, roots)
                check_media(messages)
                meta = dict(check(messages)) if check is not None else {}
                data = encode_record(messages, meta)
            except (InputError, OSError) as e:
                stats.skip(policy.handle(e, f"line {i + 1} of {source.path.name}"))
                continue
            writer.write(data)
            stats.samples += 1
        writer.close()
        if not stats.samples:
            raise NoSamplesError(f"{src}: no usable sample ({stats.summary()})", stats)
        info = {
            "format": FORMAT,
            "samples": stats.samples,
            "skipped": stats.skipped,
            "shards": writer.shards,
            **dict(metadata or {}),
        }
        (tmp / METADATA).write_text(json.dumps(info, indent=2) + "\n")
    return stats
