"""Export a qwenvl_jax Orbax folder to Hugging Face safetensors that `transformers` loads.

    python convert/orbax_to_hf.py SRC DST [--dtype bfloat16|float32] [--max-shard-size 5GB]
                                  [--overwrite] [--no-progress]

The same as `qwenvl-jax convert SRC DST --to hf`: the family's hub key names and layouts,
sharded with an index, config.json and the tokenizer/processor files alongside. See
`qwenvl_jax.loading.convert.orbax_to_hf` for the library call.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to", "hf"]))
