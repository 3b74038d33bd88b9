"""Train-step speed of qwenvl_jax against `transformers`: the same small random model, one step
of forward, backward and AdamW on the same batch, side by side.

For each family a small model (4 decoder layers of width 256, a 2-block ViT of width 128, a
4,096-token vocabulary) is built in transformers, its weights loaded into qwenvl_jax, and both
libraries train on the same B x L tokens (one picture and text per row, no padding) in float32.
Qwen3.5 and Qwen3.5-MoE stack their 4 layers as the released models do (three Gated DeltaNet
layers, then one gated full-attention layer; a quarter of each head rotates) on Qwen3-VL's vision
tower without DeepStack.

- ours: the jitted, sharded `Trainer.step` of `qwenvl-jax train` (everything trained, AdamW,
  clipping), timed after compilation;
- transformers: `model(**inputs, labels=...).loss` (plus the MoE balance loss), `backward()`,
  gradient clipping and `torch.optim.AdamW.step()`, in eager mode. Qwen3.5's linear-attention
  layers run transformers' own torch code there (`torch_chunk_gated_delta_rule` and the
  `F.conv1d` causal convolution): without the flash-linear-attention and causal-conv1d packages,
  as on a CPU, that fallback is transformers' Gated DeltaNet and the reference timed here.

tokens/s = B * L / step time. MFU = model FLOPs of the step / step time / peak FLOP/s, with the
model FLOPs counted from the config and the batch (qwenvl_jax/train/flops.py: the matmuls of the
tokens present, 3x the forward; the same number for both sides) and the peak of this machine
measured as the best float32 1024^3 matmul rate (a CPU has no published figure), or the table
in qwenvl_jax/train/metrics.py on accelerators. Each time is the median of --steps steps after
--warmup steps. Both sides start from the same weights on the same batch, so the bench stops
with an error when their first losses differ (relative 1e-4): the two sides compute one model.

--config FILE times a model of your own shape instead: any transformers config.json of a supported
family (random weights of that shape; the picture and token ids are read from it), e.g. the wider
models of bench/configs that the README's table uses.

    python bench/train.py [--family qwen2_vl ...] [--batch 4] [--seq 256] [--steps 5]
    python bench/train.py --family qwen3_5 qwen3_5_moe
    python bench/train.py --config bench/configs/train_qwen3_vl_moe.json --seq 512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}
FAMILIES = tuple(CLASSES)
MOE = ("qwen3_vl_moe", "qwen3_5_moe")  # transformers adds the balance loss when asked
IDS = dict(
    image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003
)
# both sides start from the same weights on the same batch: their first losses agree in float32
LOSS_TOL = 1e-4
GRID = (1, 8, 8)  # patches of the picture in each row: 16 merged tokens


def hf_config(family: str):
    """A small model of `family` as a transformers config."""
    import transformers

    if family.startswith("qwen3_5"):
        return qwen3_5_config(family)
    qwen3 = family.startswith("qwen3")
    rope = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [8, 12, 12] if not qwen3 else [12, 10, 10],
    }
    if qwen3:
        rope["mrope_interleaved"] = True
    text = dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters=rope,
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=128,
            hidden_size=256,
            num_heads=2,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **IDS)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=128,
            intermediate_size=384,
            num_heads=2,
            out_hidden_size=256,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            hidden_act="silu",
        )
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **IDS)
    text.update(head_dim=64)
    vision = dict(
        depth=2,
        hidden_size=128,
        intermediate_size=384,
        num_heads=2,
        out_hidden_size=256,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
        hidden_act="gelu_pytorch_tanh",
    )
    if family == "qwen3_vl_moe":
        text.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=192,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
        )
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **IDS)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **IDS)


def qwen3_5_config(
    family: str,
    *,
    vocab: int = 4096,
    ids: dict | None = None,
    width: int = 256,
    layers: int = 4,
    heads: int = 4,
    vit: dict | None = None,
):
    """A small Qwen3.5 (`family` qwen3_5 or qwen3_5_moe) as a transformers config, shaped as the
    released ones scaled down: every fourth layer full attention (gated, head_dim 64, a quarter
    of it rotating), the others Gated DeltaNet with key width = hidden width and twice as many
    value heads as key heads (head dims 64); the MoE with 8 experts (top 2) and a gated shared
    expert of one expert's width; Qwen3-VL's vision tower without DeepStack."""
    import transformers

    text = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        layer_types=[
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)
        ],
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=width // 64,
        linear_num_value_heads=2 * width // 64,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "mrope_section": [3, 3, 2],  # 16 rotary dims of 64, halved
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
    )
    vision = vit or dict(
        depth=2,
        hidden_size=128,
        intermediate_size=384,
        num_heads=2,
        out_hidden_size=width,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        hidden_act="gelu_pytorch_tanh",
    )
    ids = IDS if ids is None else ids
    if family == "qwen3_5_moe":
        del text["intermediate_size"]
        text.update(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=3 * width // 4,
            shared_expert_intermediate_size=3 * width // 4,
            router_aux_loss_coef=0.001,
        )
        return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)
    return transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids)


def load_hf_config(path: str, families: tuple[str, ...] = FAMILIES):
    """(family, transformers config) of a config.json file; a one-line exit when it is not one
    of `families`."""
    import transformers

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--config {path}: {e}") from None
    family = d.get("model_type") if isinstance(d, dict) else None
    if family not in families:
        raise SystemExit(f"--config {path}: model_type {family!r} is not one of {families}")
    return family, transformers.AutoConfig.for_model(**d)


def make_rows(family: str, cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-style inputs: each row a picture (GRID) then text, exactly `seq` tokens; the token ids
    are those of `cfg` (ours), the text drawn below every special id."""
    rng = np.random.default_rng(seed)
    t, h, w = GRID
    n = t * h * w // cfg.vision.spatial_merge_size**2
    patch_dim = 3 * cfg.vision.temporal_patch_size * cfg.vision.patch_size**2
    specials = (
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    )
    top = min(min(specials), cfg.text.vocab_size) - 96
    if seq < n + 4:
        raise SystemExit(f"--seq {seq} is shorter than the picture ({n} tokens) plus 4")
    ids = np.zeros((batch, seq), np.int64)
    types = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        ids[b, 0] = 1
        ids[b, 1] = cfg.vision_start_token_id
        ids[b, 2 : 2 + n] = cfg.image_token_id
        types[b, 2 : 2 + n] = 1
        ids[b, 2 + n] = cfg.vision_end_token_id
        ids[b, 3 + n :] = rng.integers(10, top, seq - 3 - n)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "mm_token_type_ids": types,
        "pixel_values": rng.standard_normal((batch * t * h * w, patch_dim)).astype(np.float32),
        "image_grid_thw": np.tile(np.asarray([GRID]), (batch, 1)),
    }


def our_batch(model, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training batch contract for the same rows: loss on every next token."""
    from qwenvl_jax.data.batch import vision_fields
    from qwenvl_jax.models.vision_inputs import stack_groups

    x = model.prepare(
        rows["input_ids"], rows["attention_mask"], rows["pixel_values"], rows["image_grid_thw"]
    )
    ids = np.asarray(x.input_ids)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    mask = np.zeros(ids.shape, np.float32)
    mask[:, :-1] = 1
    return {
        "input_ids": ids,
        "segment_ids": np.asarray(x.segment_ids),
        "position_ids": np.asarray(x.position_ids),
        "targets": targets,
        "loss_mask": mask,
        **vision_fields(stack_groups([x.vision])),  # one group: the one-device batch contract
    }


def time_ours(folder: Path, rows, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """(median step seconds, model FLOPs per step, compile seconds, first step's loss) of our
    train step."""
    import jax

    import qwenvl_jax as qj
    from qwenvl_jax.sharding import make_mesh
    from qwenvl_jax.train.config import from_dict
    from qwenvl_jax.train.flops import step_flops
    from qwenvl_jax.train.step import Trainer

    model = qj.from_pretrained(folder, dtype="float32")
    batch_np = our_batch(model, rows)
    mesh = make_mesh(devices=jax.devices()[:1])
    B, L = rows["input_ids"].shape
    cfg = from_dict(
        {
            "freeze": [[".*", "train"]],
            "learning_rate": 1e-5,
            "warmup_steps": 0,
            "steps": 1000,
            "batch_size": B,
            "seq_len": L,
            "clip_norm": 1.0,
            "weight_decay": 0.0,
        }
    )
    trainer = Trainer(model, cfg, mesh)
    state = trainer.init_state()
    batch = trainer.put_batch(batch_np)
    t = time.perf_counter()
    trainer.ensure_compiled(state, batch)
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = trainer.step(state, batch)
        jax.block_until_ready(m)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
    return float(np.median(times)), step_flops(model.config, batch_np), compile_s, losses[0]


def time_torch(folder: Path, family: str, rows, steps: int, warmup: int) -> tuple[float, float]:
    """(median step seconds, first step's loss) of transformers' eager train step."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where jax runs too
    model = getattr(transformers, CLASSES[family]).from_pretrained(folder, dtype=torch.float32)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    kw = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
    labels = kw["input_ids"].clone()
    moe = family in MOE
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(**kw, labels=labels, output_router_logits=moe).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return float(np.median(times)), losses[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="+", default=["qwen2_vl", "qwen3_vl_moe"], choices=FAMILIES)
    ap.add_argument(
        "--config",
        nargs="+",
        metavar="FILE",
        help="transformers config.json file(s) to time instead of the built-in --family models",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object per family")
    args = ap.parse_args()

    import jax
    import torch

    from qwenvl_jax.config import from_hf
    from qwenvl_jax.train.metrics import peak_flops

    torch.manual_seed(0)
    device = jax.devices()[0]
    peak = peak_flops(device)
    tokens = args.batch * args.seq
    if not args.json:
        print(
            f"device: {device.device_kind}, peak {peak / 1e9:.1f} GFLOP/s (float32 matmul, "
            f"measured); torch threads {torch.get_num_threads()}; batch {args.batch} x "
            f"{args.seq} tokens"
        )
        print(
            f"{'family':<14}{'params':>10}{'GFLOP/step':>12}{'compile s':>11}"
            f"{'ours tok/s':>12}{'ours MFU':>10}{'torch tok/s':>13}{'torch MFU':>11}"
            f"{'speed-up':>10}"
        )
    models = (
        [load_hf_config(f) for f in args.config]
        if args.config
        else [(f, hf_config(f)) for f in args.family]
    )
    for family, hf_cfg in models:
        cfg = from_hf(hf_cfg.to_dict())
        rows = make_rows(family, cfg, args.batch, args.seq)
        with tempfile.TemporaryDirectory() as tmp:
            import transformers

            ref = getattr(transformers, CLASSES[family])(hf_cfg)
            n_params = sum(p.numel() for p in ref.parameters())
            ref.save_pretrained(tmp)
            del ref
            ours_s, flops, compile_s, ours_loss = time_ours(
                Path(tmp), rows, args.steps, args.warmup
            )
            torch_s, torch_loss = time_torch(Path(tmp), family, rows, args.steps, args.warmup)
        if abs(ours_loss - torch_loss) > LOSS_TOL * abs(torch_loss):
            raise SystemExit(
                f"{family}: the first step's loss differs (ours {ours_loss:.6f}, transformers "
                f"{torch_loss:.6f}): the two sides do not train the same model"
            )
        result = {
            "family": family,
            "params": n_params,
            "flops_per_step": flops,
            "compile_s": compile_s,
            "ours_tokens_per_s": tokens / ours_s,
            "torch_tokens_per_s": tokens / torch_s,
            "ours_mfu": flops / ours_s / peak,
            "torch_mfu": flops / torch_s / peak,
            "speedup": torch_s / ours_s,
            "loss": ours_loss,
            "torch_loss": torch_loss,
            "peak_flops": peak,
        }
        if args.json:
            print(json.dumps(result))
            continue
        print(
            f"{family:<14}{n_params / 1e6:>9.1f}M{flops / 1e9:>12.2f}{compile_s:>11.1f}"
            f"{result['ours_tokens_per_s']:>12.0f}{100 * result['ours_mfu']:>9.1f}%"
            f"{result['torch_tokens_per_s']:>13.0f}{100 * result['torch_mfu']:>10.1f}%"
            f"{result['speedup']:>9.2f}x"
        )


if __name__ == "__main__":
    main()
