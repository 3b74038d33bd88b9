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

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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
    if family == "qwen_vl":
        return processor.decode(body, keep_box_tags=True)
    if family == "qwen2_vl":  # <|object_ref_start|> ... <|box_end|> are special tokens
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

TILE = 224
TEXT_H = 96
PRED, TRUE = (230, 20, 20), (20, 20, 20)


def draw_predictions(
    records: list[dict[str, Any]], split: Path, out: Path, n_images: int = 8, columns: int = 4
) -> None:
    """A grid of the first held-out images, each with its grounding boxes (predicted: red,
    true: thin black) and the questions' answers below (a wrong answer is marked with x)."""
    scenes = json.loads((split / "scenes.json").read_text())
    by_scene: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_scene[r["scene"]].append(r)
    shown = sorted(by_scene)[:n_images]
    rows = -(-len(shown) // columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + TEXT_H)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, k in enumerate(shown):
        x0, y0 = (n % columns) * TILE, (n // columns) * (TILE + TEXT_H)
        image = Image.open(split / scenes[k]["image"]).convert("RGB")
        scale = TILE / image.size[0]
        sheet.paste(image.resize((TILE, TILE), Image.Resampling.NEAREST), (x0, y0))
        lines = []
        for r in sorted(by_scene[k], key=lambda r: TASKS.index(r["item"]["task"])):
            item = r["item"]
            mark = "" if r["correct"] else " x"
            if item["task"] == "ground":
                t = [c * scale for c in item["box"]]
                draw.rectangle((x0 + t[0], y0 + t[1], x0 + t[2], y0 + t[3]), outline=TRUE)
                if r["box"] is not None:
                    # corners as the model wrote them, which may be the wrong way round
                    p = [c * scale for c in r["box"]]
                    left, right = sorted((x0 + p[0], x0 + p[2]))
                    top, bottom = sorted((y0 + p[1], y0 + p[3]))
                    draw.rectangle((left, top, right, bottom), outline=PRED, width=2)
                    draw.text((left + 3, top + 2), item["a"][4:], fill=PRED)
                continue
            answer = normalise(r["answer"])[:40]
            lines.append(f"{item['q'][:34]} {answer}{mark}")
        for i, line in enumerate(lines[:7]):
            draw.text((x0 + 4, y0 + TILE + 2 + 13 * i), line, fill=(0, 0, 0))
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
