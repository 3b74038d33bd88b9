"""Held-out evaluation of the demo model: batched greedy generation (`qwenvl_jax.generate`) on
every question of the held-out scenes, scored per task, drawn as a picture.

- colour, shape (together: VQA accuracy), count, position: exact match of the answer word
  (case, spaces and a final full stop ignored);
- caption: exact match of the whole sentence;
- grounding: the answer's box (`qwenvl_jax.grounding.parse_boxes`; the box named like the
  question's shape when several are given) against the true box, intersection over union
  (0 when no box is given); mean IoU, and the share with IoU >= 0.5.

The shape lists ("list" items) are a training task only: their order is random, so they are not
asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax.config import capabilities
from qwenvl_jax.grounding import parse_boxes

log = logging.getLogger(__name__)

TASKS = ("colour", "shape", "count", "position", "caption", "ground")
MAX_NEW_TOKENS = 32  # the longest answers (boxes, captions) take about 25 tokens
BATCH = 32


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def predicted_box(
    answer: str, label: str, size: tuple[int, int], family: str = "qwen_vl"
) -> tuple[int, int, int, int] | None:
    """The box the answer gives for `label` (else its first box), in pixels; None if none."""
    boxes = parse_boxes(answer, family, size)
    for name, box in boxes:
        if normalise(name) == normalise(label):
            return box
    return boxes[0][1] if boxes else None


def score(
    item: dict[str, Any], answer: str, size: tuple[int, int], family: str = "qwen_vl"
) -> dict[str, Any]:
    """One question's result: the answer, whether it is right, and for grounding the box and
    its IoU."""
    if item["task"] == "ground":
        box = predicted_box(answer, item["a"], size, family)
        value = iou(box, tuple(item["box"])) if box is not None else 0.0
        return {"answer": answer, "box": box, "iou": value, "correct": value >= 0.5}
    return {"answer": answer, "correct": normalise(answer) == normalise(item["a"])}


def _conversation(image: Image.Image, question: str) -> list[dict[str, Any]]:
    # A PIL image: the v1 prompt then names it image1.png, as the training records do.
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
        }
    ]


def decode_answer(processor: Any, token_ids: list[int], family: str) -> str:
    """The answer's text with the box tags its family writes kept (stop tokens dropped)."""
    body = [t for t in token_ids if t not in processor.eos_token_ids]
    fmt = capabilities(family).box_format
    if fmt == "ref_tags":
        return processor.decode(body, keep_box_tags=True)
    if fmt == "ref_tokens":  # <|object_ref_start|> ... <|box_end|> are special tokens
        return processor.decode(body, skip_special_tokens=False)
    return processor.decode(body)


def answer_all(
    model: Any, processor: Any, split: Path, progress: bool = True
) -> list[dict[str, Any]]:
    """Every question of a held-out split (scenes.json) answered greedily, in batches of
    questions of one task; returns one record per question (scene index, item, result)."""
    from tqdm import tqdm

    from qwenvl_jax.inference.generate import generate

    scenes = json.loads((split / "scenes.json").read_text())
    images = [Image.open(split / s["image"]).convert("RGB") for s in scenes]
    by_task: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for k, scene in enumerate(scenes):
        for item in scene["items"]:
            by_task[item["task"]].append((k, item))
    total = sum(len(v) for v in by_task.values())
    bar = tqdm(total=total, desc="evaluate", unit="question", disable=not progress)
    records = []
    for task in TASKS:
        todo = by_task.get(task, [])
        for i in range(0, len(todo), BATCH):
            chunk = todo[i : i + BATCH]
            # Full batches only, so every call reuses the compiled programs: pad with repeats.
            padded = chunk + [chunk[-1]] * (BATCH - len(chunk))
            outs = generate(
                model,
                processor,
                [_conversation(images[k], item["q"]) for k, item in padded],
                max_new_tokens=MAX_NEW_TOKENS,
            )
            for (k, item), out in zip(chunk, outs):
                text = decode_answer(processor, out.token_ids, model.family)
                records.append(
                    {"scene": k, "item": item, **score(item, text, images[k].size, model.family)}
                )
            bar.update(len(chunk))
    bar.close()
    return records


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of results.json from the per-question records."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["item"]["task"]].append(r)

    def accuracy(*tasks: str) -> float | None:
        rs = [r for t in tasks for r in by_task.get(t, [])]
        return round(float(np.mean([r["correct"] for r in rs])), 4) if rs else None

    ground = by_task.get("ground", [])
    out: dict[str, Any] = {
        "vqa_accuracy": accuracy("colour", "shape"),
        "grounding_miou": round(float(np.mean([r["iou"] for r in ground])), 4) if ground else None,
        "count_accuracy": accuracy("count"),
        "colour_accuracy": accuracy("colour"),
        "shape_accuracy": accuracy("shape"),
        "position_accuracy": accuracy("position"),
        "caption_exact_match": accuracy("caption"),
        "grounding_acc_at_0.5": accuracy("ground"),
        "questions": {t: len(by_task.get(t, [])) for t in TASKS},
    }
    return out


ROWS = (
    ("colour", "colour_accuracy", "accuracy"),
    ("shape", "shape_accuracy", "accuracy"),
    ("VQA (colour + shape)", "vqa_accuracy", "accuracy"),
    ("count", "count_accuracy", "accuracy"),
    ("position (left/right)", "position_accuracy", "accuracy"),
    ("caption", "caption_exact_match", "exact match"),
    ("grounding", "grounding_miou", "mean IoU"),
    ("grounding", "grounding_acc_at_0.5", "IoU >= 0.5"),
)


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (what the demo prints and the README shows)."""
    n = results.get("questions", {})
    count = {
        "colour_accuracy": "colour",
        "shape_accuracy": "shape",
        "count_accuracy": "count",
        "position_accuracy": "position",
        "caption_exact_match": "caption",
        "grounding_miou": "ground",
        "grounding_acc_at_0.5": "ground",
    }
    lines = ["| task | questions | metric | held-out |", "| --- | ---: | --- | ---: |"]
    for name, key, metric in ROWS:
        value = results.get(key)
        if key == "vqa_accuracy":
            questions = n.get("colour", 0) + n.get("shape", 0)
        else:
            questions = n.get(count[key], 0)
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {questions} | {metric} | {shown} |")
    if "minutes" in results:
        lines.append(
            f"\n{results['minutes']:.1f} minutes in all (data, 3 training stages, evaluation)."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the picture

TILE = 224  # each held-out image, drawn at this size
GAP = 12  # around and between the panels
PAD = 6  # between a panel's edge and its text
FONT_SIZE = 13
MAX_ANSWER = 60  # longer answers are cut (with an ellipsis) so that one cannot fill a panel
PRED, TRUE = (220, 20, 20), (20, 20, 20)
WRONG, TEXT, FRAME = (200, 0, 0), (20, 20, 20), (190, 190, 190)
LEGEND = (
    "Held-out scenes. Boxes: predicted (red, numbered as in the text below), true (black). "
    "Wrong answers in red, marked \u2717."
)

Box = tuple[float, float, float, float]


def demo_font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, the TrueType font matplotlib ships (the same font wherever the demo runs)."""
    import matplotlib

    return ImageFont.truetype(
        str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size
    )


def wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels: broken at spaces (not at no-break spaces),
    and inside a word only where the word alone is wider than that."""
    lines: list[str] = []
    line = ""
    for word in filter(None, text.split(" ")):
        joined = f"{line} {word}" if line else word
        if font.getlength(joined) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line] if line else lines


@dataclasses.dataclass(frozen=True)
class Label:
    """Text drawn at `xy` (its top-left anchor); `box` is where its ink lies, and `background`
    (a tag's) fills `box` widened by `margin`."""

    xy: tuple[float, float]
    text: str
    fill: tuple[int, int, int]
    box: Box
    background: tuple[int, int, int] | None = None
    margin: float = 0.0

    @property
    def outer(self) -> Box:
        m = self.margin
        return (self.box[0] - m, self.box[1] - m, self.box[2] + m, self.box[3] + m)


@dataclasses.dataclass
class Panel:
    """One scene: its image in `image`, its lines of text in `text` (below the image), its
    boxes (true and predicted) and labels (the lines, and the tags that number the predicted
    boxes)."""

    scene: int
    image: Box
    text: Box
    boxes: list[tuple[Box, tuple[int, int, int], int]]
    labels: list[Label]

    @property
    def bounds(self) -> Box:
        return (self.image[0], self.image[1], self.text[2], self.text[3])


def _label(font: ImageFont.FreeTypeFont, xy, text, fill, **kw) -> Label:
    left, top, right, bottom = font.getbbox(text)
    box = (xy[0] + left, xy[1] + top, xy[0] + right, xy[1] + bottom)
    return Label(xy, text, fill, box, **kw)


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(a: Box, area: Box) -> bool:
    return area[0] <= a[0] and area[1] <= a[1] and a[2] <= area[2] and a[3] <= area[3]


def place_tag(
    font: ImageFont.FreeTypeFont, text: str, near: Box, area: Box, taken: list[Box]
) -> Label:
    """A tag (white `text` on red) at a corner of box `near`: above its top-left corner if
    there is room, else inside it, below it or at its right; shifted into `area`, and clear of
    the boxes in `taken` (else at the first free place in `area`, scanning rows)."""
    margin = 2.0
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 2 * margin, bottom - top + 2 * margin
    l, t, r, b = near
    corners = [(l, t - h), (l, t), (l, b), (r - w, t), (r - w, b - h), (r, t)]
    step = max(2.0, h / 2)
    scan = [
        (area[0] + i * step, area[1] + j * step)
        for j in range(int((area[3] - area[1] - h) // step) + 1)
        for i in range(int((area[2] - area[0] - w) // step) + 1)
    ]
    for x, y in corners + scan:
        x = min(max(x, area[0]), area[2] - w)
        y = min(max(y, area[1]), area[3] - h)
        outer = (x, y, x + w, y + h)
        if not any(_overlaps(outer, other) for other in taken):
            xy = (x + margin - left, y + margin - top)
            return _label(font, xy, text, (255, 255, 255), background=PRED, margin=margin)
    raise ValueError(f"no room for tag {text!r}")


def _lines(
    records: list[dict[str, Any]], font: ImageFont.FreeTypeFont, width: float
) -> tuple[list[tuple[str, tuple[int, int, int]]], list[tuple[dict, str | None]]]:
    """A scene's lines of text (wrapped to `width`, each with its colour) and its grounding
    records, each with the number of its tag (None when the answer gave no box)."""
    lines, ground = [], []
    for r in sorted(records, key=lambda r: TASKS.index(r["item"]["task"])):
        item = r["item"]
        if item["task"] == "ground":
            if r["box"] is None:
                text = f"{item['a']}: no box"
                ground.append((r, None))
            else:
                tag = str(1 + sum(t is not None for _, t in ground))
                text = f"[{tag}] {item['a']}: IoU\u00a0{r['iou']:.2f}"
                ground.append((r, tag))
        else:
            answer = normalise(r["answer"])
            if len(answer) > MAX_ANSWER:
                answer = answer[: MAX_ANSWER - 1].rstrip() + "\u2026"
            text = f"{item['q']} \u2192\u00a0{answer or '(nothing)'}"
        if not r["correct"]:
            text += "\u00a0\u2717"
        fill = TEXT if r["correct"] else WRONG
        lines += [(line, fill) for line in wrap(text, font, width)]
    return lines, ground


def layout(
    records: list[dict[str, Any]],
    font: ImageFont.FreeTypeFont,
    n_images: int = 8,
    columns: int = 4,
    image_size: int = 112,
) -> tuple[tuple[int, int], list[Label], list[Panel]]:
    """Where everything of the picture goes: the sheet's size, the legend's lines and one panel
    per scene (the first `n_images` scenes of `records`, `columns` a row). Every panel is as
    tall as the one with the most lines, so that all its text fits below its image."""
    by_scene: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_scene[r["scene"]].append(r)
    shown = sorted(by_scene)[:n_images]
    ascent, descent = font.getmetrics()
    pitch = ascent + descent + 2
    width = columns * TILE + (columns + 1) * GAP
    legend = [
        _label(font, (GAP, GAP + i * pitch), line, TEXT)
        for i, line in enumerate(wrap(LEGEND, font, width - 2 * GAP))
    ]
    top = GAP + len(legend) * pitch + GAP // 2
    content = {k: _lines(by_scene[k], font, TILE - 2 * PAD) for k in shown}
    most = max((len(lines) for lines, _ in content.values()), default=0)
    text_h = most * pitch + 2 * PAD
    scale = TILE / image_size
    panels = []
    for n, k in enumerate(shown):
        x0 = GAP + (n % columns) * (TILE + GAP)
        y0 = top + (n // columns) * (TILE + text_h + GAP)
        image = (x0, y0, x0 + TILE, y0 + TILE)
        text = (x0, y0 + TILE, x0 + TILE, y0 + TILE + text_h)
        lines, ground = content[k]
        labels = [
            _label(font, (x0 + PAD, y0 + TILE + PAD + i * pitch), line, fill)
            for i, (line, fill) in enumerate(lines)
        ]
        boxes, taken = [], []
        for r, _ in ground:
            t = [c * scale for c in r["item"]["box"]]
            boxes.append(((x0 + t[0], y0 + t[1], x0 + t[2], y0 + t[3]), TRUE, 1))
        for r, tag in ground:
            if tag is None:
                continue
            # corners as the model wrote them (maybe the wrong way round), kept to the image
            xs = [min(max(x0 + c * scale, x0), x0 + TILE) for c in r["box"][::2]]
            ys = [min(max(y0 + c * scale, y0), y0 + TILE) for c in r["box"][1::2]]
            box = (min(xs), min(ys), max(xs), max(ys))
            boxes.append((box, PRED, 2))
            label = place_tag(font, tag, box, image, taken)
            taken.append(label.outer)
            labels.append(label)
        panels.append(Panel(k, image, text, boxes, labels))
    rows = -(-len(shown) // columns)
    height = top + rows * (TILE + text_h + GAP)
    return (width, height), legend, panels


def draw_predictions(
    records: list[dict[str, Any]], split: Path, out: Path, n_images: int = 8, columns: int = 4
) -> None:
    """A grid of the first held-out images, each with its grounding boxes (predicted: red and
    numbered, true: thin black) and the questions' answers below it (a wrong one in red, marked
    with a cross)."""
    scenes = json.loads((split / "scenes.json").read_text())
    font = demo_font()
    images = {r["scene"]: split / scenes[r["scene"]]["image"] for r in records}
    first = next(iter(images.values()), None)
    image_size = Image.open(first).size[0] if first is not None else 112
    size, legend, panels = layout(records, font, n_images, columns, image_size)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    for p in panels:
        image = Image.open(images[p.scene]).convert("RGB")
        sheet.paste(image.resize((TILE, TILE), Image.Resampling.NEAREST), p.image[:2])
        draw.rectangle(p.bounds, outline=FRAME)
        for box, colour, width in p.boxes:
            draw.rectangle(box, outline=colour, width=width)
    for label in legend + [label for p in panels for label in p.labels]:
        if label.background is not None:
            draw.rectangle(label.outer, fill=label.background)
        draw.text(label.xy, label.text, fill=label.fill, font=font)
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="PNG", optimize=True)
    tmp.replace(out)


def evaluate(
    model_dir: Path, split: Path, workdir: Path, family: str = "qwen_vl", progress: bool = True
) -> dict[str, Any]:
    """Answer the held-out questions with the model in `model_dir`; write
    WORKDIR/predictions.jsonl and WORKDIR/predictions.png; return the metrics."""
    from qwenvl_jax.modeling import from_pretrained
    from qwenvl_jax.processing.processor import Processor

    model = from_pretrained(model_dir, dtype="float32")
    processor = Processor.from_pretrained(model_dir)
    records = answer_all(model, processor, split, progress)
    with open(workdir / "predictions.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    draw_predictions(records, split, workdir / "predictions.png")
    return summarise(records)
