"""The demo's synthetic task: pictures of a few coloured shapes on varied backgrounds, with
captions, questions (colour, shape, count, relative position) and grounding targets.

A scene is drawn from a seeded generator, so a split is defined by its seed and size alone. Each
scene yields conversations in the HF chat format the data pipeline reads, grounding answers given
as `{"type": "box", ...}` entries in pixels (the pipeline writes them in the family's convention).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qwenvl_jax.errors import ConfigError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
# Every shape gets a dark outline: a kind is then drawn by its edges as well as by where its fill
# is, which a small ViT trained from scratch can tell apart sooner.
OUTLINE = (40, 40, 40)
COUNT_WORDS = ("zero", "one", "two", "three")
TASKS = ("colour", "shape", "ground", "count", "position", "caption", "list")


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
        arr = base + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x1, y1, x2, y2 = s.box
    fill = COLOURS[s.colour]
    line = dict(outline=OUTLINE, width=max(2, (x2 - x1) // 9))
    if s.kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill, **line)
    elif s.kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill, **line)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill, **line)


def make_scene(
    rng: np.random.Generator,
    size: int = 112,
    max_shapes: int = 3,
    grid: int = 8,
    cells: tuple[int, int] = (1, 2),
) -> Scene:
    """1..max_shapes shapes with distinct (colour, kind) pairs and boxes at least a cell apart.

    Corners lie on a grid x grid lattice (at 112 px and 8 cells: the 14 px patches of the ViT)
    and sides span cells[0] to cells[1] cells. A shape then always falls on the patches in the
    same few ways, and a box is one of a few values per coordinate: what lets a small model
    trained from scratch learn shapes and boxes in minutes. Shapes have a dark edge (OUTLINE)."""
    cell = size / grid
    n = int(rng.integers(1, max_shapes + 1))
    shapes: list[Shape] = []
    used = set()
    tries = 0
    while len(shapes) < n and tries < 200:
        tries += 1
        side = int(rng.integers(cells[0], cells[1] + 1))
        x1, y1 = (int(rng.integers(0, grid - side + 1)) for _ in range(2))
        box = tuple(round(v * cell) for v in (x1, y1, x1 + side, y1 + side))
        if any(_overlap(box, s.box, gap=2) for s in shapes):
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
    """The items (task, q, a[, box]) of one scene (tasks in TASKS); every answer is
    unambiguous: a colour question names a shape kind the scene holds once, a shape question a
    colour it holds once, and a position question two shapes whose centres are at least an eighth
    of the width apart."""
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
    size = scene.image.size[0]
    pairs = [
        (a, b)
        for a in scene.shapes
        for b in scene.shapes
        if a is not b and abs(a.cx - b.cx) >= size / 8
    ]
    if pairs:
        sa, sb = pairs[int(rng.integers(len(pairs)))]
        side = "left" if sa.cx < sb.cx else "right"
        out.append(dict(task="position", q=f"Is {sa.name} left or right of {sb.name}?", a=side))
    out.append(dict(task="caption", q="Describe the picture.", a=caption(scene)))
    # Kind before colour, in a random order: the caption ("a red circle") teaches finding a
    # shape by its colour; only this teaches finding it by its kind, which colour questions need.
    listed = [scene.shapes[k] for k in rng.permutation(len(scene.shapes))]
    out.append(
        dict(
            task="list",
            q="List each shape and its colour.",
            a=", ".join(f"{s.kind} {s.colour}" for s in listed) + ".",
        )
    )
    return out


def _answer(item: dict) -> list[dict]:
    if item["task"] == "ground":
        return [{"type": "box", "label": item["a"], "box": list(item["box"])}]
    return [{"type": "text", "text": item["a"]}]


def to_messages(image_path: str, items: list[dict]) -> dict:
    """Questions about one image as an HF-format conversation: the image and the first question,
    its answer, then each further question and answer as a turn of its own. Grounding answers
    are box entries (the data pipeline writes them in the family's format)."""
    first = [{"type": "image", "image": image_path}, {"type": "text", "text": items[0]["q"]}]
    messages = []
    for k, item in enumerate(items):
        user = first if k == 0 else [{"type": "text", "text": item["q"]}]
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _answer(item)},
        ]
    return {"messages": messages, "tasks": [item["task"] for item in items]}


def write_split(
    folder: str | Path,
    n_scenes: int,
    seed: int,
    size: int = 112,
    per_conversation: int = 1,
    max_shapes: int = 3,
    grid: int = 8,
    cells: tuple[int, int] = (1, 2),
    tasks: tuple[str, ...] = TASKS,
    repeat: dict[str, int] | None = None,
    progress: bool = False,
) -> Path:
    """Render n_scenes pictures into folder/images and write folder/data.jsonl, one line per
    conversation: a scene's questions in a random order, `per_conversation` at a time (0: all
    of them in one conversation), and folder/scenes.json (the ground truth, for evaluation),
    written last. Only the items of `tasks` are kept; `repeat` asks some tasks' items more than
    once (task -> times, in data.jsonl only: a weight for training). Returns the JSONL path."""
    from tqdm import tqdm

    repeat = dict(repeat or {})
    unknown = sorted((set(tasks) | set(repeat)) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown demo task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
    bad = [t for t, n in repeat.items() if not (isinstance(n, int) and n >= 1)]
    if bad:
        raise ConfigError(f"repeat.{bad[0]} must be an integer >= 1, got {repeat[bad[0]]!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = []
    with open(folder / "data.jsonl", "w") as f:
        for i in tqdm(
            range(n_scenes), desc=f"data: {folder.name}", unit="scene", disable=not progress
        ):
            scene = make_scene(rng, size, max_shapes, grid, tuple(cells))
            rel = f"images/{i:05d}.png"
            scene.image.save(folder / rel)
            items = [item for item in questions(scene, rng) if item["task"] in tasks]
            order = [items[k] for k in rng.permutation(len(items))]
            # Repeats follow the draw, so the scenes do not depend on them.
            order = [item for item in order for _ in range(repeat.get(item["task"], 1))]
            step = per_conversation or len(order)
            for k in range(0, len(order), step):
                f.write(json.dumps(to_messages(rel, order[k : k + step])) + "\n")
            scenes.append(
                {
                    "image": rel,
                    "items": items,
                    "shapes": [dataclasses.asdict(s) for s in scene.shapes],
                }
            )
    tmp = folder / ".scenes.json.tmp"
    tmp.write_text(json.dumps(scenes))
    tmp.replace(folder / "scenes.json")
    return folder / "data.jsonl"
