"""`qwenvl-jax serve`: an OpenAI-compatible chat server (`POST /v1/chat/completions`, streamed or
not, `GET /v1/models`, `GET /health`) over one checkpoint, with continuous batching: up to
--max-batch requests decode together, each joining as soon as a slot is free.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qwenvl_jax.commands import add_model_argument

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description=__doc__.split("\n\n")[0],
    )
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients ask for (default: the folder's name)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8, metavar="N", help="requests decoding at once"
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=4096,
        metavar="T",
        help="cache slots per request: its prompt (padded to 64, 128, ..., 1024, then multiples "
        "of 1024 tokens) plus max_tokens",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot; more are answered 429",
    )
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request")
    p.add_argument("--max-videos", type=int, default=2, metavar="N", help="videos per request")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=40_000_000,
        metavar="N",
        help="width x height of one image, before resizing",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on accelerators",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax.commands.generate import _default_dtype, enable_compilation_cache
    from qwenvl_jax.errors import CheckpointError, InputError

    folder = Path(args.model)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in ("max_batch", "max_len", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.max_images < 0 or args.max_videos < 0:
        raise InputError("--max-queue, --max-images and --max-videos must be >= 0")
    enable_compilation_cache()

    import uvicorn

    from qwenvl_jax.config import load_config
    from qwenvl_jax.modeling import from_pretrained
    from qwenvl_jax.processing.processor import Processor
    from qwenvl_jax.serving.api import Limits, create_app
    from qwenvl_jax.serving.engine import Engine

    load_config(folder)  # a bad config.json fails here, before the weights load
    processor = Processor.from_pretrained(folder)
    model = from_pretrained(folder, dtype=args.dtype or _default_dtype())
    engine = Engine(
        model,
        processor,
        max_batch=args.max_batch,
        max_len=args.max_len,
        max_queue=args.max_queue,
    )
    limits = Limits(
        max_images=args.max_images,
        max_videos=args.max_videos,
        max_image_pixels=args.max_image_pixels,
    )
    name = args.served_model_name or folder.resolve().name
    app = create_app(engine, name, limits)
    print(f"serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
