"""`qwenvl-jax demo [--workdir DIR]`: the embedded default.

On a machine with no weights and no data, it generates a synthetic dataset of coloured shapes,
trains a scaled-down Qwen-VL through the three training stages with the real training code,
evaluates it on held-out images, and prints the table. It writes DIR/results.json,
DIR/predictions.png and DIR/model/ (which `qwenvl-jax generate --model DIR/model` answers from).
Started again on the same DIR, it resumes.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train a small Qwen-VL on synthetic shapes end to end and evaluate it",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "--workdir",
        default="qwenvl_demo",
        metavar="DIR",
        help="run folder (default: ./qwenvl_demo)",
    )
    p.add_argument(
        "--family",
        default="qwen_vl",
        metavar="F",
        help="model family (default: qwen_vl, the paper's architecture)",
    )
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    # A shortened run (tests, CI): scene counts and training steps multiplied by F.
    p.add_argument("--scale", type=float, default=1.0, metavar="F", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax.demo.evaluate import format_table
    from qwenvl_jax.demo.run import run_demo

    results = run_demo(
        args.workdir, args.family, scale=args.scale, seed=args.seed, progress=not args.no_progress
    )
    print(format_table(results))
    print(
        f"results: {args.workdir}/results.json, picture: {args.workdir}/predictions.png, "
        f"model: {args.workdir}/model"
    )
    return 0
