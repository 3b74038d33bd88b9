"""`qwenvl-jax convert SRC DST [--to orbax|hf] [--dtype bfloat16|float32]`.

HF folder -> Orbax folder (default), or with `--to hf` an Orbax folder -> HF safetensors. DST is
written in a temporary sibling folder and renamed when complete, so a failed conversion leaves no
DST behind; every failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qwenvl_jax.errors import CheckpointError, InputError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """A byte count from text, as transformers reads max_shard_size: "5GB" -> 5_000_000_000,
    "512MiB" -> 536_870_912, "1000" -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 512MiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint: Hugging Face -> Orbax, or Orbax -> Hugging Face (--to hf)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("src", help="source folder (HF checkpoint, or an Orbax folder with --to hf)")
    p.add_argument("dst", help="destination folder (must not exist, or be empty)")
    p.add_argument(
        "--to", choices=("orbax", "hf"), default="orbax", help="destination format (default: orbax)"
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="stored dtype (default: the source's; FP8 is dequantised to bfloat16)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors shard for --to hf (default: 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty DST (only once the new one is complete)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax.loading import convert
    from qwenvl_jax.loading.writer import atomic_dir

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise InputError(f"{dst}: must lie outside the source folder {src}")
    try:
        with atomic_dir(dst, overwrite=args.overwrite) as tmp:
            if args.to == "orbax":
                result = convert.hf_to_orbax(src, tmp, args.dtype, progress=not args.no_progress)
            else:
                result = convert.orbax_to_hf(
                    src, tmp, args.dtype, args.max_shard_size, progress=not args.no_progress
                )
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as e:  # disk full, I/O errors: one line, like any bad input
        raise CheckpointError(f"{e.filename or dst}: {e.strerror or e}") from e
    print(
        f"wrote {dst} ({result.family}, {result.dtype}, {result.tensors} tensors, "
        f"{result.nbytes / 1e9:.2f} GB)"
    )
    return 0
