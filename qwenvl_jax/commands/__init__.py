"""Sub-commands of the `qwenvl-jax` CLI: each module has `add_parser(subparsers)`, `run(args)`."""

COMMANDS = ("convert", "generate", "data", "train", "plan", "demo", "serve")
