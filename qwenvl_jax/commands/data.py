"""`qwenvl-jax data SRC.jsonl DST [--family F] [--model PATH]`: JSONL conversations and their
media into self-contained ArrayRecord shards that `train` reads (data.train=DST).

Every line is parsed (HF `messages` or LLaVA/ShareGPT `conversations`, media paths relative to
the JSONL file) and every image and video decoded once. Media files must lie inside the JSONL
file's folder (after `..` and symbolic links are resolved) or inside a `--media-root` folder;
others are skipped (media_outside_root). With `--model` each sample also goes through that
checkpoint's processor and chat template, and its token and patch counts are kept; samples of
more than `--max-tokens` tokens (default: the model's context length, max_position_embeddings)
are skipped (too_long), a text too long by its size alone without being tokenized.
Bad lines are counted and skipped (`--strict`: the first one is an error). The skip reasons are
printed on stderr, and the last line printed is `samples N, skipped M`; the exit status is 0 when
some samples were written, else 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qwenvl_jax.config import FAMILIES
from qwenvl_jax.errors import ConfigError, InputError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "data",
        help="convert JSONL conversations into ArrayRecord shards",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("src", metavar="SRC.jsonl", help="one sample per line")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty)")
    p.add_argument("--family", choices=FAMILIES, help="model family the data is meant for")
    p.add_argument(
        "--model",
        metavar="PATH",
        help="checkpoint folder: check each sample with its processor and template",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="with --model: skip longer samples (default: the model's context length)",
    )
    p.add_argument(
        "--media-root",
        action="append",
        default=[],
        metavar="DIR",
        help="also take media files from inside DIR (repeatable; default: only the JSONL's folder)",
    )
    p.add_argument("--records-per-shard", type=int, default=1000, metavar="N")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def _checker(model: str, family: str | None, max_tokens: int | None) -> tuple[Any, str]:
    """The full per-sample transform of a checkpoint, as a `check(messages) -> meta` function;
    samples of more than `max_tokens` tokens (default: the model's context length) fail it."""
    from qwenvl_jax.config import load_config
    from qwenvl_jax.data.transforms import SampleTransform
    from qwenvl_jax.processing.processor import Processor

    config = load_config(model)
    if family is not None and family != config.family:
        raise ConfigError(f"--family {family} does not match {model} (a {config.family} model)")
    if max_tokens is None:
        max_tokens = config.text.max_position_embeddings
    transform = SampleTransform(Processor.from_pretrained(model), config, max_tokens=max_tokens)

    def check(messages: list) -> dict[str, int]:
        example = transform.example(messages)
        return {
            "tokens": example.num_tokens,
            "patches": example.num_patches,
            "images": example.num_images,
        }

    return check, config.family


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qwenvl_jax.data.arrayrecord import NoSamplesError, convert_jsonl

    check, family = None, args.family
    if args.max_tokens is not None and not args.model:
        raise InputError("--max-tokens needs --model (tokens are counted with its tokenizer)")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.model:
        check, family = _checker(args.model, args.family, args.max_tokens)
    meta = {"family": family, "model": args.model, "source": str(args.src)}
    progress = lambda it: tqdm(it, desc="samples", unit="", disable=not sys.stderr.isatty())  # noqa: E731
    try:
        stats = convert_jsonl(
            args.src,
            args.dst,
            check=check,
            strict=args.strict,
            records_per_shard=args.records_per_shard,
            overwrite=args.overwrite,
            metadata=meta,
            progress=progress,
            media_roots=args.media_root,
        )
    except NoSamplesError as e:
        print(e.stats.summary())
        print(f"qwenvl-jax data: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items()))
    if reasons:
        print(f"skipped: {reasons}", file=sys.stderr)
    print(stats.summary())
    return 0
