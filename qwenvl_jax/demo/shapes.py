"""The demo's synthetic task: pictures of a few coloured shapes on varied backgrounds, with
captions, questions (colour, shape, count, relative position) and grounding targets.

A scene is drawn from a seeded generator, so a split is defined by its seed and size alone. Each
scene yields conversations in the HF chat format the data pipeline reads, grounding answers given
as `{"type": "box", ...}` entries in pixels (the pipeline writes them in the family's convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.kind}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Plain, gradient or speckled, always pale so the shapes stand out."""
    base = rng.integers(170, 250, size=3)
    kind = rng.integers(3)
    if kind == 0:
        arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    elif kind == 1:
        other = rng.integers(170, 250, size=3)
        t = np.linspace(0, 1, size)[:, None, None]
        arr = base * (1 - t) + other * t
        if rng.integers(2):
            arr = arr.transpose(1, 0, 2)
        arr = np.broadcast_to(arr, (size, size, 3))
    else:
        arr = base + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x1, y1, x2, y2 = s.box
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif s.kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)


def make_scene(rng: np.random.Generator, size: int = 112, max_shapes: int = 3) -> Scene:
    """1..max_shapes shapes, distinct (colour, kind) pairs, boxes that do not overlap."""
    n = int(rng.integers(1, max_shapes + 1))
    shapes: list[Shape] = []
    used = set()
    tries = 0
    while len(shapes) < n and tries < 200:
        tries += 1
        side = int(rng.integers(size * 22 // 100, size * 38 // 100))
        x1 = int(rng.integers(0, size - side))
        y1 = int(rng.integers(0, size - side))
        box = (x1, y1, x1 + side, y1 + side)
        if any(_overlap(box, s.box, gap=3) for s in shapes):
            continue
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if (kind, colour) in used:
            continue
        used.add((kind, colour))
        shapes.append(Shape(kind, colour, box))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw(draw, s)
    return Scene(image, tuple(shapes))


def _overlap(a, b, gap: int = 0) -> bool:
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def caption(scene: Scene) -> str:
    parts = [f"a {s.colour} {s.kind}" for s in sorted(scene.shapes, key=lambda s: s.cx)]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """(kind, question, answer[, box]) items for one scene; every answer is unambiguous."""
    out = []
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            out.append(dict(task="colour", q=f"What colour is the {s.kind}?", a=s.colour))
        if colours.count(s.colour) == 1:
            out.append(dict(task="shape", q=f"What shape is the {s.colour} object?", a=s.kind))
        out.append(dict(task="ground", q=f"Where is {s.name}?", a=s.name, box=s.box))
    out.append(dict(task="count", q="How many shapes are there?", a=COUNT_WORDS[len(kinds)]))
    if len(scene.shapes) >= 2:
        a, b = rng.choice(len(scene.shapes), size=2, replace=False)
        sa, sb = scene.shapes[a], scene.shapes[b]
        side = "left" if sa.cx < sb.cx else "right"
        out.append(dict(task="position", q=f"Is {sa.name} left or right of {sb.name}?", a=side))
    out.append(dict(task="caption", q="Describe the picture.", a=caption(scene)))
    return out


def to_messages(image_path: str, item: dict) -> dict:
    """One question as an HF-format conversation (grounding answers as a box entry)."""
    user = [{"type": "image", "image": image_path}, {"type": "text", "text": item["q"]}]
    if item["task"] == "ground":
        answer = [{"type": "box", "label": item["a"], "box": list(item["box"])}]
    else:
        answer = [{"type": "text", "text": item["a"]}]
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "task": item["task"],
    }


def write_split(folder: str | Path, n_scenes: int, seed: int, size: int = 112) -> Path:
    """Render n_scenes pictures into folder/images and write folder/data.jsonl (one line per
    question) plus folder/scenes.json (the ground truth, for evaluation)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = []
    with open(folder / "data.jsonl", "w") as f:
        for i in range(n_scenes):
            scene = make_scene(rng, size)
            rel = f"images/{i:05d}.png"
            scene.image.save(folder / rel)
            items = questions(scene, rng)
            for item in items:
                f.write(json.dumps(to_messages(rel, item)) + "\n")
            scenes.append(
                {
                    "image": rel,
                    "items": [{k: v for k, v in it.items()} for it in items],
                    "shapes": [s.__dict__ for s in scene.shapes],
                }
            )
    (folder / "scenes.json").write_text(json.dumps(scenes))
    return folder / "data.jsonl"
