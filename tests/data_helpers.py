"""Shared pieces of the data-pipeline tests: processor folders with small image budgets, real
pictures from scikit-image, and JSONL files of conversations.

`processor_folder` is a checkpoint folder without weights (the real Qwen tokenizer and the real
chat template and preprocessor configs of a released checkpoint, from ../shared), with the pixel
budget made small so that images give a few dozen tokens and tests stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tests.processor_fixtures import make_checkpoint

IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
WORDS = ("the", "cat", "dog", "sat", "on", "a", "mat", "red", "blue", "green", "big", "small",
         "house", "tree", "sky", "under", "near", "far", "bright", "dark", "old", "new", "round")


def skimage_image(name: str) -> str:
    import skimage.data

    return os.path.join(os.path.dirname(skimage.data.__file__), name)


def small_pixels(family: str, low: int = 4, high: int = 16) -> dict[str, Any]:
    """Preprocessor overrides that keep an image between `low` and `high` merged tokens."""
    side = 32 if family.startswith("qwen3") else 28
    lo, hi = low * side * side, high * side * side
    return {"min_pixels": lo, "max_pixels": hi, "size": {"shortest_edge": lo, "longest_edge": hi}}


def update_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2))


def processor_folder(family: str, dest: Path, low: int = 4, high: int = 16) -> Path:
    """A weightless checkpoint folder of `family` whose images give low..high merged tokens."""
    folder = make_checkpoint(family, Path(dest))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (folder / name).is_file():
            update_json(folder / name, small_pixels(family, low, high))
    return folder


def copy_images(folder: Path) -> list[str]:
    """The sample pictures copied into `folder` (so JSONL files can name them relatively)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        shutil.copy(skimage_image(name), folder / name)
    return list(IMAGES)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One record a line; a record that is a string is written as is (a malformed line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def text(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


def conversations(n: int, seed: int = 0, image_dir: str = "") -> list[dict[str, Any]]:
    """n conversations of varied length: HF-format ones with an image (every other one), LLaVA
    ones without; each question starts with `sample <i>` so tests can tell samples apart."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        question = f"sample {i}: " + text(rng, 2, 20)
        answer = text(rng, 2, 40)
        if i % 2:
            image = os.path.join(image_dir, IMAGES[i % len(IMAGES)]) if image_dir else \
                IMAGES[i % len(IMAGES)]
            out.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]})
        else:
            out.append({"conversations": [{"from": "human", "value": question},
                                           {"from": "gpt", "value": answer}]})
    return out
