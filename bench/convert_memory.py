"""Peak host memory of `hf_to_orbax` (and optionally `orbax_to_hf`) on a generated checkpoint.

Writes a made-up Qwen2-VL checkpoint of about `--gb` GB (bfloat16, random weights, real 151,936
vocabulary, a few wide layers) tensor by tensor with `loading.writer.write_safetensors`, then runs
each conversion in a fresh interpreter and reports its peak RSS (VmHWM) minus that of an
interpreter that imported the same modules and started the same JAX backend.

    python bench/convert_memory.py --gb 2 [--workdir DIR] [--to-hf]

Prints one JSON object: {"checkpoint_bytes", "largest_tensor_bytes", "baseline_rss_bytes",
"hf_to_orbax": {"peak_rss_bytes", "above_baseline_bytes", "seconds"}, with --to-hf also
"orbax_to_hf": {...} and "round_trip_identical"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151936
HIDDEN = 1024
INTERMEDIATE = 16384
HEADS, KV_HEADS = 8, 2


def hf_config(layers: int) -> dict:
    """A Qwen2-VL config.json: wide text layers, a one-block vision tower."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
        "vision_config": {
            "depth": 1,
            "embed_dim": 64,
            "hidden_size": HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
    }


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(hub key, shape) of every tensor, built from the model's own abstract parameters."""
    from qwenvl_jax.config import from_hf
    from qwenvl_jax.loading import load, orbax_io
    from qwenvl_jax.loading.mapping import mapping_for
    from qwenvl_jax.modeling import build_model

    config = from_hf(hf_config(layers))
    abstract = orbax_io.flat_params(build_model(config, dtype="bfloat16", abstract=True))
    ghosts = {p: load.ghost(s.shape, s.dtype) for p, s in abstract.items()}
    return [(k, tuple(a.shape)) for k, a in mapping_for(config).export_tensors(ghosts)]


def make_checkpoint(folder: Path, target_bytes: int, seed: int = 0) -> dict:
    """Write the checkpoint, one random tensor at a time; returns its sizes."""
    from qwenvl_jax.loading.writer import write_safetensors

    fixed = 2 * VOCAB * HIDDEN * 2
    per_layer = (
        3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS * KV_HEADS)
    ) * 2
    layers = max(1, round((target_bytes - fixed) / per_layer))
    shapes = tensor_shapes(layers)
    rng = np.random.default_rng(seed)

    def tensors():
        for key, shape in shapes:
            # Random bfloat16 of magnitude ~0.01-0.1: incompressible, like real weights.
            bits = rng.integers(0x3C00, 0x3DCC, size=shape, dtype=np.uint16)
            bits |= rng.integers(0, 2, size=shape, dtype=np.uint16) << 15
            yield key, bits.view(ml_dtypes.bfloat16)

    folder.mkdir(parents=True, exist_ok=True)
    result = write_safetensors(
        folder, tensors(), max_shard_bytes=2**30, plan=[(k, s, "bfloat16") for k, s in shapes]
    )
    (folder / "config.json").write_text(json.dumps(hf_config(layers), indent=2))
    largest = max(math.prod(s) * 2 for _, s in shapes)
    return {
        "checkpoint_bytes": result.total_size,
        "largest_tensor_bytes": largest,
        "layers": layers,
        "files": result.files,
    }


_PRELUDE = """
import os, sys
sys.path.insert(0, {root!r})
import jax, orbax.checkpoint.experimental.v1, tqdm
from qwenvl_jax.loading import convert
jax.devices()
"""
_REPORT = """
print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
"""


def _peak_rss(body: str) -> tuple[int, float]:
    """Run PRELUDE + body in a fresh interpreter: (VmHWM in bytes, seconds)."""
    code = _PRELUDE.format(root=str(ROOT)) + body + _REPORT
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) * 1024, seconds


def measure(workdir: Path, gb: float, to_hf: bool = False) -> dict:
    src, orbax, back = workdir / "hf", workdir / "orbax", workdir / "hf_back"
    report = make_checkpoint(src, int(gb * 1e9))
    report["baseline_rss_bytes"], _ = _peak_rss("")
    peak, seconds = _peak_rss(
        f"convert.hf_to_orbax({str(src)!r}, {str(orbax)!r}, 'bfloat16', progress=False)"
    )
    report["hf_to_orbax"] = {
        "peak_rss_bytes": peak,
        "seconds": round(seconds, 1),
        "above_baseline_bytes": peak - report["baseline_rss_bytes"],
    }
    if to_hf:
        peak, seconds = _peak_rss(
            f"convert.orbax_to_hf({str(orbax)!r}, {str(back)!r}, progress=False)"
        )
        report["orbax_to_hf"] = {
            "peak_rss_bytes": peak,
            "seconds": round(seconds, 1),
            "above_baseline_bytes": peak - report["baseline_rss_bytes"],
        }
        report["round_trip_identical"] = identical(src, back)
    return report


def identical(a: Path, b: Path) -> bool:
    """Whether two checkpoint folders hold the same tensors bit for bit (read one at a time)."""
    from qwenvl_jax.loading.reader import open_checkpoint

    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        if ra.keys() != rb.keys():
            return False
        return all(
            ra.dtype(k) == rb.dtype(k)
            and ra.shape(k) == rb.shape(k)
            and np.array_equal(ra.get(k).view(np.uint8), rb.get(k).view(np.uint8))
            for k in ra
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--to-hf", action="store_true", help="also measure orbax_to_hf")
    args = parser.parse_args()
    if args.workdir is not None:
        print(json.dumps(measure(args.workdir, args.gb, args.to_hf), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        print(json.dumps(measure(Path(tmp), args.gb, args.to_hf), indent=2))


if __name__ == "__main__":
    main()
