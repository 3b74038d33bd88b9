"""Sub-commands of the `qwenvl-jax` CLI: each module has `add_parser(subparsers)`, `run(args)`."""

from __future__ import annotations

import argparse


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """`--model PATH`, the checkpoint a command loads (generate, serve)."""
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a Hugging Face checkpoint folder or a `qwenvl-jax convert` folder",
    )


COMMANDS = ("convert", "generate", "data", "train", "plan", "demo", "serve")
