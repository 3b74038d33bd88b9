"""`qwenvl-jax generate`: answer one user turn (the images, then the videos, then the prompt) with a
checkpoint, streaming the text, or printing one JSON object with `--json`; `--draw` writes the
first image with the boxes the answer names. Sampling settings not given come from the checkpoint's
generation_config.json, as in transformers; `--greedy` decodes greedily without a repetition
penalty.

Bad input (a missing or corrupt image or video, a folder that is not a checkpoint, a prompt longer
than the model allows) raises a QwenVLError, which the CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenvl_jax.commands import add_model_argument

log = logging.getLogger(__name__)

CACHE_DIR = Path("~/.cache/qwenvl_jax/jax_cache")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="answer a prompt about images and videos",
        description=__doc__.split("\n\n")[0],
    )
    add_model_argument(p)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image (repeat for several; they come first, in order)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FILE",
        help="a video (repeat for several; after the images)",
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user's text")
    p.add_argument("--system", metavar="TEXT", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    sampling = p.add_argument_group(
        "sampling",
        "Settings left out take the checkpoint's generation_config.json values (do_sample, "
        "temperature, top_p, top_k, repetition_penalty), else transformers' defaults, as "
        "transformers' generate() does. Qwen2.5-VL's file, for one, asks for a repetition "
        "penalty of 1.05.",
    )
    sampling.add_argument(
        "--greedy",
        action="store_true",
        help="plain greedy decoding: no sampling and no repetition penalty (unless "
        "--repetition-penalty is given)",
    )
    sampling.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="0 decodes greedily, > 0 samples",
    )
    sampling.add_argument("--top-p", type=float, metavar="P", help="1 = off")
    sampling.add_argument("--top-k", type=int, metavar="K", help="0 = off")
    sampling.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="divides the positive logits (multiplies the negative ones) of every token already "
        "in the sequence, prompt included; 1 = off",
    )
    sampling.add_argument("--seed", type=int, default=0, metavar="S", help="the sampling seed")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on accelerators",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, prompt_tokens, timings)",
    )
    p.add_argument(
        "--draw", metavar="OUT.png", help="write the first image with the boxes named in the answer"
    )
    return p


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, unless one is configured already
    (JAX_COMPILATION_CACHE_DIR or jax.config)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path = CACHE_DIR.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))


def build_messages(
    images: list[str], videos: list[str], prompt: str, system: str | None = None
) -> list[dict]:
    """One user turn in the HF chat format: the images in order, then the videos, then the text."""
    content = [{"type": "image", "image": str(i)} for i in images]
    content += [{"type": "video", "video": str(v)} for v in videos]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def _check_media(images: list[str], videos: list[str]) -> None:
    """Fail before the model loads: files must exist and images must decode."""
    from qwenvl_jax.errors import InputError
    from qwenvl_jax.processing.image import load_image

    for v in videos:
        if not os.path.isfile(v):
            raise InputError(f"video file not found: {v}")
    for i in images:
        if not os.path.isfile(i):
            raise InputError(f"image file not found: {i}")
        load_image(i)  # InputError when the file does not decode


def _default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def input_size_fn(processor: Any, family: str) -> Callable[[int, int], tuple[int, int]] | None:
    """For a family whose boxes are pixels of the resized input (qwen2_5_vl): (width, height) of
    an image -> the (width, height) this processor resizes it to. None for the other families."""
    from qwenvl_jax.grounding import in_input_pixels

    if not in_input_pixels(family):
        return None
    from qwenvl_jax.processing.image import smart_resize

    cfg = processor.image_config

    def size(width: int, height: int) -> tuple[int, int]:
        h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        return w, h

    return size


def draw_boxes(
    image_path: str,
    answer: str,
    family: str,
    out: str,
    input_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> int:
    """Draw the boxes that `qwenvl_jax.grounding.parse_boxes` finds in the answer (decoded with
    its special tokens) onto the image, write it to `out` atomically, and return their number.
    input_size: see `input_size_fn`."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageOps

    from qwenvl_jax.grounding import parse_boxes

    with PIL.Image.open(image_path) as f:
        image = PIL.ImageOps.exif_transpose(f).convert("RGB")
    size = image.size
    boxes = parse_boxes(answer, family, size, input_size=input_size(*size) if input_size else None)
    canvas = PIL.ImageDraw.Draw(image)
    colors = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6")
    width = max(2, round(min(size) / 200))
    for k, (label, box) in enumerate(boxes):
        color = colors[k % len(colors)]
        canvas.rectangle(box, outline=color, width=width)
        if label:
            canvas.text((box[0] + width, box[1] + width), label, fill=color)
    out_path = Path(out)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    image.save(tmp, format=PIL.Image.registered_extensions().get(out_path.suffix.lower(), "PNG"))
    os.replace(tmp, out_path)
    return len(boxes)


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax.config import load_config
    from qwenvl_jax.errors import CheckpointError, InputError

    enable_compilation_cache()
    folder = Path(args.model)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    config = load_config(folder)
    if args.draw and not args.image:
        raise InputError("--draw needs an --image to draw on")
    if args.greedy:
        given = [f for f in ("temperature", "top_p", "top_k") if getattr(args, f) is not None]
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise InputError(f"--greedy does not sample: leave out {flags}")
    _check_media(args.image, args.video)

    from qwenvl_jax.inference.generate import generate, sampling_settings
    from qwenvl_jax.modeling import from_pretrained
    from qwenvl_jax.processing.processor import Processor

    processor = Processor.from_pretrained(folder)
    penalty = args.repetition_penalty
    if args.greedy and penalty is None:
        penalty = 1.0
    settings = sampling_settings(
        processor.generation_config,
        do_sample=False if args.greedy else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=penalty,
    )
    model = from_pretrained(folder, dtype=args.dtype or _default_dtype())
    messages = build_messages(args.image, args.video, args.prompt, args.system)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = generate(
        model,
        processor,
        messages,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stream=None if args.json else stream,
        **settings._asdict(),
    )
    if args.json:
        timings = {
            k: round(float(out.timings[k]), 6)
            for k in ("compile_s", "prefill_s", "decode_tokens_per_s")
        }
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "prompt_tokens": out.prompt_tokens,
                    "timings": timings,
                },
                ensure_ascii=False,
            )
        )
    else:
        stream("\n")
    if args.draw:
        answer = processor.decode(out.token_ids, skip_special_tokens=False)
        n = draw_boxes(
            args.image[0], answer, config.family, args.draw, input_size_fn(processor, config.family)
        )
        if n == 0:
            log.warning("the answer names no boxes; %s is the image unchanged", args.draw)
    return 0
