"""The demo's initial checkpoint: a scaled-down model with random weights, written as a Hugging
Face folder, so the real training code starts from it (`model=<folder>`) exactly as it would
from a released checkpoint.

For Qwen-VL (v1, the default) the folder is in the original remote-code layout: config.json (the
`QWenConfig` keys, with the demo's sizes and `visual.n_queries`), generation_config.json,
tokenizer_config.json, `qwen.tiktoken` (the demo's own BPE ranks, demo/vocab.py; the processor
puts the special tokens right after them) and model.safetensors (the original checkpoint names,
loading/mapping_v1.py). For Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE it is in the
transformers layout of those families: config.json, tokenizer.json with the same ranks
(demo/hf_tokenizer.py), the chat template, preprocessor_config.json and model.safetensors.

Initialisation: the model code initialises like the original (normal(0.02) weights), which suits
widths of 1664 to 4096; at the demo's widths of 64 to 128 it makes every signal several times too
small, and the vision path then takes thousands of steps to start being used. The demo instead
draws each linear layer from normal(1/sqrt(fan_in)) and the ViT's position table from
normal(POS_STD), so that patches know where they are from the start. For Qwen-VL the resampler
also starts local, each query reading its own patch cell (`_local_start`): a randomly
initialised resampler learns to pool every shape into every query, and grounding then has
nothing to read positions from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from qwenvl_jax.demo.vocab import train_vocab, write_tiktoken

log = logging.getLogger(__name__)

POS_STD = 0.5
# Qwen-VL's local start (_local_start).
LOCAL_GAIN = 8.0
LOCAL_CHANNELS = 4
VIT_POS_GAIN = 2.0
# In the order tokenization_qwen.py assigns ids after the ranks (processing/qwen_vl_v1.py).
N_SPECIAL = 3 + 205 + 9
IMG_START_OFFSET = 3 + 205 + 6  # <img> among the specials


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoModelSize:
    """The scaled-down sizes. LLM: hidden, layers, heads (head_dim = hidden // heads), SwiGLU
    width; ViT: image_size (px, a multiple of patch_size), width, layers, heads; the resampler's
    n_queries (a square); vocab_ranks: at most that many BPE ranks."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    mlp: int = 384
    image_size: int = 112
    patch_size: int = 14
    vit_width: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    vit_mlp_ratio: float = 4.0
    n_queries: int = 16
    vocab_ranks: int = 512
    experts: int = 4  # Qwen3-VL-MoE: experts per MoE layer, 2 active

    @classmethod
    def from_dict(cls, d: dict) -> DemoModelSize:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from qwenvl_jax.errors import ConfigError

            raise ConfigError(
                f"unknown demo model size key {unknown[0]!r} (known: {sorted(names)})"
            )
        return cls(**d)


def _padded(n: int) -> int:
    return -(-n // 64) * 64


def hf_config(size: DemoModelSize, n_ranks: int, family: str = "qwen_vl") -> dict:
    """config.json of `family` (the original Qwen-VL format for qwen_vl) for `size` and a
    vocabulary of n_ranks BPE ranks (the embedding padded to a multiple of 64 past the special
    tokens)."""
    if family != "qwen_vl":
        return _modern_config(size, n_ranks, family)
    vocab = _padded(n_ranks + N_SPECIAL)
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0,
        "bf16": False,
        "fp16": False,
        "fp32": True,
        "hidden_size": size.hidden,
        "intermediate_size": 2 * size.mlp,  # the original halves it for w1 / w2
        "kv_channels": size.hidden // size.heads,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "float32",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": False,
        "use_logn_attn": True,
        "visual": {
            "heads": size.vit_heads,
            "image_size": size.image_size,
            "image_start_id": n_ranks + IMG_START_OFFSET,
            "layers": size.vit_layers,
            "mlp_ratio": size.vit_mlp_ratio,
            "n_queries": size.n_queries,
            "output_dim": size.hidden,
            "patch_size": size.patch_size,
            "width": size.vit_width,
        },
        "vocab_size": vocab,
    }


def _modern_config(size: DemoModelSize, n_ranks: int, family: str) -> dict:
    from qwenvl_jax.demo.hf_tokenizer import SPECIAL_TOKENS

    ids = {t: n_ranks + i for i, t in enumerate(SPECIAL_TOKENS)}
    head_dim = size.hidden // size.heads
    text = {
        "vocab_size": _padded(n_ranks + len(SPECIAL_TOKENS)),
        "hidden_size": size.hidden,
        "intermediate_size": size.mlp,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": size.vit_layers,
        "num_heads": size.vit_heads,
        "in_chans": 3,
        "in_channels": 3,
        "patch_size": size.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    vit_mlp = int(size.vit_width * size.vit_mlp_ratio)
    config = {
        "architectures": [
            {
                "qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration",
                "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
            }[family]
        ],
        "model_type": family,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "torch_dtype": "float32",
    }
    if family in ("qwen2_vl", "qwen2_5_vl"):  # flat text keys, as the hub configs
        # M-RoPE sections (t, h, w) over the head_dim / 2 frequencies, as (16, 24, 24) of 64
        section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
        config.update(
            text, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": section}
        )
        if family == "qwen2_vl":
            vision.update(
                embed_dim=size.vit_width,
                hidden_size=size.hidden,
                mlp_ratio=size.vit_mlp_ratio,
                hidden_act="quick_gelu",
            )
        else:
            vision.update(
                hidden_size=size.vit_width,
                out_hidden_size=size.hidden,
                intermediate_size=vit_mlp,
                hidden_act="silu",
                window_size=112,
                fullatt_block_indexes=[size.vit_layers - 1],
                tokens_per_second=2,
            )
    else:
        hw = 5 * head_dim // 32  # as (24, 20, 20) of 64
        text.update(
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "default",
                "mrope_interleaved": True,
                "mrope_section": [head_dim // 2 - 2 * hw, hw, hw],
            },
        )
        if family == "qwen3_vl_moe":
            text.update(
                num_experts=size.experts,
                num_experts_per_tok=2,
                moe_intermediate_size=size.mlp // 2,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                router_aux_loss_coef=0.001,
            )
        grid = size.image_size // size.patch_size
        vision.update(
            hidden_size=size.vit_width,
            out_hidden_size=size.hidden,
            intermediate_size=vit_mlp,
            hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=grid * grid,
            deepstack_visual_indexes=[0],
        )
        config.update(text_config=text, tie_word_embeddings=False)
    config["vision_config"] = vision
    return config


def _side_files(n_ranks: int, family: str, size: DemoModelSize) -> dict[str, dict]:
    eod = n_ranks  # <|endoftext|>, the first special token of either vocabulary
    if family != "qwen_vl":
        from qwenvl_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        pixels = size.image_size**2
        return {
            "generation_config.json": {
                "do_sample": False,
                "eos_token_id": [eod + 2, eod],
                "pad_token_id": eod,
                "max_new_tokens": 64,
            },
            "preprocessor_config.json": {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": pixels,
                "max_pixels": pixels,
                "patch_size": size.patch_size,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": list(OPENAI_CLIP_MEAN),
                "image_std": list(OPENAI_CLIP_STD),
            },
        }
    return {
        "generation_config.json": {
            "chat_format": "chatml",
            "do_sample": False,
            "eos_token_id": eod,
            "pad_token_id": eod,
            "max_new_tokens": 64,
            "max_window_size": 6144,
            "top_k": 0,
            "top_p": 1.0,
        },
        "tokenizer_config.json": {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"},
    }


def demo_init(
    params: dict[str, np.ndarray], seed: int = 0, image_grid: int = 0
) -> dict[str, np.ndarray]:
    """The demo's initial values for a {dotted path: array} of a freshly built model (see the
    module docstring); other parameters (embeddings, norms, biases, resampler tables and
    queries, `visual.proj`) are kept, but for Qwen-VL's local start (`_local_start`, given the
    patch grid side `image_grid`)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, value in params.items():
        if path.endswith(".kernel") and value.ndim == 2:
            std = value.shape[0] ** -0.5
        elif path == "visual.positional_embedding":
            std = POS_STD
        else:
            out[path] = value
            continue
        out[path] = (rng.standard_normal(value.shape) * std).astype(value.dtype)
    if "visual.attn_pool.query" in out and image_grid:
        _local_start(out, rng, image_grid)
    return out


def _local_start(params: dict[str, np.ndarray], rng: np.random.Generator, image_grid: int) -> None:
    """Qwen-VL: the resampler's query i starts out reading patch cell i, and each patch starts
    out with a code of its row plus one of its column (in place).

    The resampler's query and key share the fixed 2-D sin-cos table; the q and k projections
    start as LOCAL_GAIN times the identity on its LOCAL_CHANNELS fastest sin and cos channels of
    each axis (zero elsewhere), and ln_q/ln_kv start at zero there, so attention starts as a
    sharp function of position alone and each of the n_queries image embeddings describes its
    own cell. Otherwise every query starts out averaging the whole picture, training learns to
    pool the shapes into each of them, and which shape is where is lost. The ViT's position
    table starts as VIT_POS_GAIN * (row code + column code)/sqrt(2), constant over the table
    cells that resize to one patch, so that a patch's row and column can be read off linearly.
    Applied when the queries tile the image_grid x image_grid patches and that grid divides the
    16x16 table; otherwise all keep their normal values."""
    query, table = params["visual.attn_pool.query"], params["visual.positional_embedding"]
    n_queries, dim = query.shape
    side = int(round(np.sqrt(table.shape[0])))
    grid = int(round(np.sqrt(n_queries)))
    if grid * grid != n_queries or side % grid or image_grid != grid:
        return
    quarter = dim // 4
    channels = [
        half + part + j
        for half in (0, 2 * quarter)
        for part in (0, quarter)
        for j in range(LOCAL_CHANNELS)
    ]
    for name in ("q_proj", "k_proj"):
        kernel = np.zeros((dim, dim), query.dtype)
        kernel[channels, channels] = LOCAL_GAIN
        params[f"visual.attn_pool.attn.{name}.kernel"] = kernel
    for name in ("ln_q", "ln_kv"):
        weight = params[f"visual.attn_pool.{name}.weight"].copy()
        weight[channels] = 0.0
        params[f"visual.attn_pool.{name}.weight"] = weight
    width = table.shape[1]
    rows, cols = rng.standard_normal((2, grid, width))
    code = (rows[:, None] + cols[None, :]) * (VIT_POS_GAIN / np.sqrt(2))  # [grid, grid, W]
    block = side // grid
    full = np.repeat(np.repeat(code, block, axis=0), block, axis=1)
    params["visual.positional_embedding"] = full.reshape(side * side, width).astype(table.dtype)


def write_initial_checkpoint(
    folder: str | Path,
    size: DemoModelSize,
    texts: list[str],
    seed: int = 0,
    family: str = "qwen_vl",
) -> Path:
    """Train the BPE ranks on `texts`, then write the random-weight checkpoint folder of
    `family` (all or nothing: built under a temporary name and renamed). Returns the folder."""
    from qwenvl_jax.config import from_hf
    from qwenvl_jax.loading.mapping import mapping_for
    from qwenvl_jax.loading.writer import atomic_dir, write_safetensors
    from qwenvl_jax.modeling import build_model, params_as_numpy

    ranks = train_vocab(texts, size.vocab_ranks)
    config = hf_config(size, len(ranks), family)
    model_config = from_hf(config)
    model = build_model(model_config, dtype="float32", seed=seed)
    with atomic_dir(folder, overwrite=True) as tmp:
        if family == "qwen_vl":
            write_tiktoken(ranks, tmp / "qwen.tiktoken")
        else:
            from qwenvl_jax.demo.hf_tokenizer import write_tokenizer_files
            from qwenvl_jax.processing.qwen_vl_v1 import PAT_STR

            write_tokenizer_files(ranks, tmp, PAT_STR)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in _side_files(len(ranks), family, size).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        params = demo_init(
            params_as_numpy(model), seed, image_grid=size.image_size // size.patch_size
        )
        tensors = mapping_for(model_config).export_tensors(params)
        write_safetensors(tmp, tensors)
    log.info(
        "initial model: %d BPE ranks, vocab %d, written to %s",
        len(ranks),
        config["vocab_size"],
        folder,
    )
    return Path(folder)
