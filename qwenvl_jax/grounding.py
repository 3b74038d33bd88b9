"""Bounding boxes in model text, for every family: parsing answers into pixel boxes, and writing
pixel boxes into training targets the same way the family's checkpoints were trained to answer.

- qwen_vl: `<ref>cup</ref><box>(x1,y1),(x2,y2)</box>`, several boxes may follow one ref;
  integers in [0, 1000) of the image width and height.
- qwen2_vl: the same with `<|object_ref_start|>`, `<|object_ref_end|>`, `<|box_start|>`,
  `<|box_end|>`; [0, 1000).
- qwen2_5_vl: JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": "cup"}]` (often in a ```json
  fence); absolute pixels of the model's input image (the smart-resized size).
- qwen3_vl, qwen3_vl_moe: the same JSON; integers in [0, 1000].

A family's format is its `box_format` capability (qwenvl_jax.config.Capabilities); the functions
here take the family and work by that format.

`image_size` is always `(width, height)` of the picture the boxes are wanted in (the original
image). For qwen2_5_vl, `input_size` is the `(width, height)` the processor resized it to;
by default that of the released preprocessor configs (`smart_resize`, 28 px, 3136 to 12845056
pixels). The tags must be kept when decoding (`keep_box_tags=True` for qwen_vl,
`skip_special_tokens=False` for qwen2_vl).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from qwenvl_jax.config import CAPABILITIES
from qwenvl_jax.errors import InputError

Box = tuple[int, int, int, int]
RELATIVE = 1000  # the [0, 1000) grid of the tag formats and "json_relative"
# The tags of the two tag formats: reference open / close, box open / close.
_TAGS = {
    "ref_tags": ("<ref>", "</ref>", "<box>", "</box>"),
    "ref_tokens": ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"),
}
# The families with a box format, in qwenvl_jax.config.FAMILIES order.
FAMILIES = tuple(f for f, c in CAPABILITIES.items() if c.box_format is not None)
# Qwen2.5-VL's released preprocessor_config.json
_QWEN25_RESIZE = dict(factor=28, min_pixels=3136, max_pixels=12845056)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"


def box_format(family: str) -> str:
    """The family's box format (the `box_format` capability); InputError for a family without."""
    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r} for boxes (one of {FAMILIES})")
    return CAPABILITIES[family].box_format


def in_input_pixels(family: str) -> bool:
    """Whether the family's boxes are pixels of the processor's resized input image (then
    `input_size` matters); False for other families, those without a box format included."""
    return family in FAMILIES and box_format(family) == "json_input_pixels"


def _check(family: str, image_size: Sequence[int]) -> tuple[str, tuple[int, int]]:
    fmt = box_format(family)
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InputError(f"image_size must be (width, height), got {image_size!r}") from None
    if w <= 0 or h <= 0:
        raise InputError(f"image_size must be positive, got {image_size!r}")
    return fmt, (w, h)


def _input_size(image_size: tuple[int, int], input_size: Sequence[int] | None) -> tuple[int, int]:
    if input_size is not None:
        return int(input_size[0]), int(input_size[1])
    from qwenvl_jax.processing.image import smart_resize

    h, w = smart_resize(image_size[1], image_size[0], **_QWEN25_RESIZE)
    return w, h


def _clamp(v: float, hi: int) -> int:
    return min(max(int(v), 0), hi)


def parse_boxes(
    text: str, family: str, image_size: Sequence[int], *, input_size: Sequence[int] | None = None
) -> list[tuple[str, Box]]:
    """Every box in `text` as (label, (x1, y1, x2, y2)) in pixels of image_size = (width,
    height), in the order they appear; label "" when no reference names the box. Relative
    coordinates map to pixels as the original drawing code does: int(v / 1000 * size)."""
    fmt, (w, h) = _check(family, image_size)
    absolute = fmt == "json_input_pixels"
    if fmt in _TAGS:
        raw = _parse_tags(text, *_TAGS[fmt])
    else:
        raw = _parse_json(text)
    if absolute:
        iw, ih = _input_size((w, h), input_size)
        scale = (w / iw, h / ih)
    out = []
    for label, (x1, y1, x2, y2) in raw:
        if absolute:
            px = (
                round(x1 * scale[0]),
                round(y1 * scale[1]),
                round(x2 * scale[0]),
                round(y2 * scale[1]),
            )
        else:
            px = (x1 / RELATIVE * w, y1 / RELATIVE * h, x2 / RELATIVE * w, y2 / RELATIVE * h)
        out.append(
            (label, (_clamp(px[0], w), _clamp(px[1], h), _clamp(px[2], w), _clamp(px[3], h)))
        )
    return out


def _parse_tags(
    text: str, ref_open: str, ref_close: str, box_open: str, box_close: str
) -> list[tuple[str, tuple[float, ...]]]:
    ref = re.escape(ref_open) + r"(.*?)" + re.escape(ref_close)
    box = re.escape(box_open) + rf"\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)" + re.escape(box_close)
    out, label, end = [], "", 0
    for m in re.finditer(f"{ref}|{box}", text, flags=re.S):
        if m.group(1) is not None:
            label = m.group(1).strip()
        else:
            # A box belongs to the reference right before it (other boxes between them allowed).
            if text[end : m.start()].strip():
                label = ""
            out.append((label, tuple(float(m.group(i)) for i in range(2, 6))))
        end = m.end()
    return out


def _parse_json(text: str) -> list[tuple[str, tuple[float, ...]]]:
    body = text
    fence = re.search(r"```(?:json)?\s*(.*?)(?:```|$)", text, flags=re.S)
    if fence:
        body = fence.group(1)
    items = None
    start = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if start >= 0:
        try:
            items = json.loads(body[start:])
        except json.JSONDecodeError:
            items = None
    if items is None:  # truncated or chatty output: take each complete object
        items = []
        for m in re.finditer(r"\{[^{}]*\}", body):
            try:
                items.append(json.loads(m.group(0)))
            except json.JSONDecodeError:
                continue
    if isinstance(items, dict):
        items = [items]
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        bbox = item.get("bbox_2d", item.get("bbox"))
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            continue
        label = item.get("label", "")
        out.append(("" if label is None else str(label), tuple(float(v) for v in bbox)))
    return out


def _relative(v: float, size: int, top: int) -> int:
    return min(max(round(v / size * RELATIVE), 0), top)


def format_box(
    label: str | None,
    box_px: Sequence[float],
    family: str,
    image_size: Sequence[int],
    *,
    input_size: Sequence[int] | None = None,
) -> str:
    """One box as the family's answers write it (a JSON object for the JSON families).
    box_px: (x1, y1, x2, y2) in pixels of image_size = (width, height)."""
    fmt, (w, h) = _check(family, image_size)
    if len(box_px) != 4:
        raise InputError(f"a box is (x1, y1, x2, y2), got {box_px!r}")
    x1, y1, x2, y2 = (float(v) for v in box_px)
    if fmt in _TAGS:
        ref_open, ref_close, box_open, box_close = _TAGS[fmt]
        top = RELATIVE - 1  # [0, 1000)
        c = (
            _relative(x1, w, top),
            _relative(y1, h, top),
            _relative(x2, w, top),
            _relative(y2, h, top),
        )
        ref = f"{ref_open}{label}{ref_close}" if label else ""
        return f"{ref}{box_open}({c[0]},{c[1]}),({c[2]},{c[3]}){box_close}"
    if fmt == "json_input_pixels":
        iw, ih = _input_size((w, h), input_size)
        c = (round(x1 * iw / w), round(y1 * ih / h), round(x2 * iw / w), round(y2 * ih / h))
    else:
        c = (
            _relative(x1, w, RELATIVE),
            _relative(y1, h, RELATIVE),
            _relative(x2, w, RELATIVE),
            _relative(y2, h, RELATIVE),
        )
    return json.dumps({"bbox_2d": list(c), "label": label or ""}, ensure_ascii=False)


def format_boxes(
    items: Iterable[tuple[str | None, Sequence[float]]],
    family: str,
    image_size: Sequence[int],
    *,
    input_size: Sequence[int] | None = None,
) -> str:
    """Several (label, box_px) as one answer: consecutive tags for qwen_vl / qwen2_vl (boxes
    with the same label after one reference), a ```json fenced list for the JSON families."""
    items = list(items)
    fmt = box_format(family)
    if fmt not in _TAGS:
        objects = [
            format_box(label, box, family, image_size, input_size=input_size)
            for label, box in items
        ]
        return "```json\n[\n\t" + ",\n\t".join(objects) + "\n]\n```"
    parts, previous = [], None
    for label, box in items:
        text = format_box(label, box, family, image_size)
        if label and label == previous:  # one reference, several boxes
            text = text[text.index(_TAGS[fmt][2]) :]
        parts.append(text)
        previous = label
    return "".join(parts)
