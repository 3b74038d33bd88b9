"""The `qwenvl-jax` entry point. Each sub-command lives in qwenvl_jax/commands/<name>.py.

Bad input (any QwenVLError, a missing file) ends with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from qwenvl_jax.commands import COMMANDS
from qwenvl_jax.errors import QwenVLError

DESCRIPTION = (
    "The Qwen-VL family in JAX: convert checkpoints, generate, prepare data, train, run the demo."
)


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="qwenvl-jax", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"qwenvl_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"qwenvl_jax.commands.{name}":
                continue  # not built yet
            raise
        mod.add_parser(sub)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except QwenVLError as e:
        print(f"qwenvl-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"qwenvl-jax {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwenvl-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
