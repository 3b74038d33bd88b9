"""Convert a Hugging Face checkpoint folder to a qwenvl_jax Orbax folder.

    python convert/hf_to_orbax.py SRC DST [--dtype bfloat16|float32] [--overwrite] [--no-progress]

The same as `qwenvl-jax convert SRC DST`: streamed one tensor at a time, FP8 dequantised, DST
written atomically. See `qwenvl_jax.loading.convert.hf_to_orbax` for the library call.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to", "orbax"]))
