"""Model configuration: frozen dataclasses per part, parsed from a checkpoint's config.json.

One `ModelConfig` describes any family: a `TextConfig` for the decoder (shared by every family,
Qwen-VL v1 included, with flags for the few numerics that differ), and a vision config, either
`VisionConfig` (the native-resolution ViT of Qwen2/2.5/3-VL) or `V1VisionConfig` (the fixed 448 px
OpenCLIP ViT plus resampler of Qwen-VL v1). `from_hf` reads the nested (text_config / vision_config)
and the older flat config.json forms. Presets for the released checkpoints live in configs/models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.resources import config_dir

FAMILIES = (
    "qwen_vl",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "qwen3_5_moe",
)
_MODEL_TYPE_TO_FAMILY = {
    "qwen": "qwen_vl",
    "qwen_vl": "qwen_vl",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
}
LAYER_TYPES = ("full_attention", "linear_attention")
PRESET_DIR = config_dir("models")
VIDEO_TIMES = ("none", "index", "seconds", "timestamps")
BOX_FORMATS = ("ref_tags", "ref_tokens", "json_input_pixels", "json_relative")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What sets a family apart beyond its config.json, named, so that code asks for the
    capability instead of testing the family: a new family is a row of `CAPABILITIES`, its config
    fields and its layers, not more branches. Differences the config's own fields tell are fields
    of TextConfig (norm_zero_centered, attn_output_gate, mrope_interleaved, layer_types,
    num_experts, ...) and of VisionConfig (`norm`, `gated_mlp`, `patch_bias`, `window_attention`,
    deepstack_visual_indexes, ...)."""

    # Whole fixed-size images through a resampler (Qwen-VL v1, `V1VisionConfig`): no patch grid
    # and no video; batches budget images instead of patches.
    fixed_size_images: bool = False
    # How a video's time reaches the model (VIDEO_TIMES): "none" (no video); "index" (the temporal
    # M-RoPE index counts temporal patches); "seconds" (it counts seconds: the vision config's
    # tokens_per_second times the processor's `second_per_grid_ts`); "timestamps" (a
    # "<t seconds>" text before each temporal patch, which is its own vision block and M-RoPE
    # item).
    video_time: str
    # Frame sampling and video preprocessing defaults ("qwen2" | "qwen3", as HF's video
    # processors of Qwen2-VL and Qwen3-VL); None without video.
    video_sampling: str | None
    # How its answers write boxes (BOX_FORMATS, see `qwenvl_jax.grounding`): "ref_tags"
    # `<ref>..</ref><box>(x1,y1),(x2,y2)</box>` in [0, 1000); "ref_tokens" the same with the
    # `<|object_ref_start|>` .. `<|box_end|>` special tokens; "json_input_pixels" JSON `bbox_2d`
    # in pixels of the resized input image; "json_relative" JSON `bbox_2d` in [0, 1000]. None:
    # no format established for the family.
    box_format: str | None
    # The family whose processor (chat template, image and video preprocessing) its checkpoints
    # use, when not its own (as transformers' processing_auto maps them).
    processor: str | None = None

    def __post_init__(self) -> None:
        if self.video_time not in VIDEO_TIMES:
            raise ConfigError(f"unknown video_time {self.video_time!r} (one of {VIDEO_TIMES})")
        if self.box_format is not None and self.box_format not in BOX_FORMATS:
            raise ConfigError(f"unknown box_format {self.box_format!r} (one of {BOX_FORMATS})")


_QWEN3_VL = Capabilities(
    video_time="timestamps", video_sampling="qwen3", box_format="json_relative"
)
CAPABILITIES = {
    "qwen_vl": Capabilities(
        fixed_size_images=True, video_time="none", video_sampling=None, box_format="ref_tags"
    ),
    "qwen2_vl": Capabilities(video_time="index", video_sampling="qwen2", box_format="ref_tokens"),
    "qwen2_5_vl": Capabilities(
        video_time="seconds", video_sampling="qwen2", box_format="json_input_pixels"
    ),
    "qwen3_vl": _QWEN3_VL,
    "qwen3_vl_moe": _QWEN3_VL,
    "qwen3_5": dataclasses.replace(_QWEN3_VL, box_format=None, processor="qwen3_vl"),
    "qwen3_5_moe": dataclasses.replace(_QWEN3_VL, box_format=None, processor="qwen3_vl"),
}


def capabilities(family: str) -> Capabilities:
    """The capabilities of a family (see `Capabilities`)."""
    if family not in CAPABILITIES:
        raise ConfigError(f"unknown model family {family!r} (one of {FAMILIES})")
    return CAPABILITIES[family]


# Fields that may be 0 (off); every other int field must be >= 1 and every float field > 0.
_MAY_BE_ZERO = {
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "window_size",
    "num_position_embeddings",
    "tokens_per_second",
    "router_aux_loss_coef",
    "shared_expert_intermediate_size",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "mtp_num_hidden_layers",
}


def _check_fields(obj: Any) -> None:
    """Each int / float field of a config dataclass holds a number of its type in range, so a
    broken config.json fails where it is parsed, naming the field, not later in a division."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        where = f"{type(obj).__name__}.{f.name}"
        if f.type in ("int", "float"):
            ok = isinstance(v, int) if f.type == "int" else isinstance(v, int | float)
            if not ok or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"{where} must be a number ({f.type}), got {v!r}")
            if v < 0 or (v == 0 and f.name not in _MAY_BE_ZERO):
                raise ConfigError(f"{where} must be positive, got {v!r}")
        elif f.type.startswith("tuple[int") and not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
        ):
            raise ConfigError(f"{where} must be a list of non-negative integers, got {list(v)!r}")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The decoder. Defaults are those of Qwen2; families override through `from_hf`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # Frequencies per M-RoPE axis (t, h, w); they sum to head_dim // 2.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    mrope_interleaved: bool = False
    attention_bias: bool = True  # bias on q/k/v (o_proj never has one)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Mixture of experts (Qwen3-VL-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Qwen3.5-MoE: a shared SwiGLU expert next to the routed ones, scaled per token by
    # sigmoid(shared_expert_gate(x)); 0 = none.
    shared_expert_intermediate_size: int = 0
    # Hybrid decoders (Qwen3.5): the kind of each layer, "full_attention" or "linear_attention"
    # (Gated DeltaNet); empty means every layer is full attention.
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # Rotary embedding on the first head_dim * partial_rotary_factor dimensions only.
    partial_rotary_factor: float = 1.0
    # Gated attention (Qwen3.5): q_proj gives per head [query | gate]; the attention output is
    # multiplied by sigmoid(gate) before o_proj.
    attn_output_gate: bool = False
    # RMSNorm weights stored zero-centred (Qwen3.5): the scale is (1 + w), applied in float32.
    norm_zero_centered: bool = False
    # Multi-token-prediction layers the checkpoints carry (kept through conversion, not run).
    mtp_num_hidden_layers: int = 0
    # Numerics that differ between the original Qwen-VL v1 code and transformers' Qwen2/3.
    rope_in_activation_dtype: bool = True  # cos/sin cast to the activation dtype (Qwen2/3)
    softmax_in_fp32: bool = True
    use_dynamic_ntk: bool = False  # Qwen-VL v1
    use_logn_attn: bool = False  # Qwen-VL v1
    seq_length: int = 2048  # Qwen-VL v1: the trained length for NTK and logn

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_hidden_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"unknown layer type {bad[0]!r} (use one of {LAYER_TYPES})")
        if self.has_linear_layers:
            heads = (self.linear_num_key_heads, self.linear_num_value_heads)
            dims = (self.linear_key_head_dim, self.linear_value_head_dim)
            if not all(heads + dims) or self.linear_conv_kernel_dim < 1:
                raise ConfigError(
                    "linear-attention layers need linear_num_key_heads, linear_num_value_heads, "
                    "linear_key_head_dim, linear_value_head_dim and linear_conv_kernel_dim"
                )
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ConfigError(
                    f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                    f"linear_num_key_heads {self.linear_num_key_heads}"
                )
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and give "
                f"an even number of rotary dimensions (head_dim {self.head_dim})"
            )

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each head that rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full_attention"

    @property
    def has_linear_layers(self) -> bool:
        return "linear_attention" in self.layer_types

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class _Tower:
    norm: str  # "layernorm" | "rmsnorm"
    gated_mlp: bool  # SwiGLU MLP instead of fc1 -> act -> fc2
    patch_bias: bool  # bias on the patch embedding


# The block layers of each ViT kind (what its config.json does not say).
_TOWERS = {
    "qwen2_vl": _Tower(norm="layernorm", gated_mlp=False, patch_bias=False),
    "qwen2_5_vl": _Tower(norm="rmsnorm", gated_mlp=True, patch_bias=False),
    "qwen3_vl": _Tower(norm="layernorm", gated_mlp=False, patch_bias=True),
}


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The native-resolution ViT of Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

    kind: str  # one of _TOWERS: "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    depth: int
    hidden_size: int  # ViT width
    out_hidden_size: int  # LLM width
    num_heads: int
    intermediate_size: int
    hidden_act: str  # quick_gelu | silu | gelu_pytorch_tanh
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2.5-VL window attention
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0
    # Qwen3-VL learned position table and DeepStack taps
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.kind not in _TOWERS:
            raise ConfigError(f"unknown vision kind {self.kind!r} (one of {tuple(_TOWERS)})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not a multiple of num_heads "
                f"{self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def norm(self) -> str:
        return _TOWERS[self.kind].norm

    @property
    def gated_mlp(self) -> bool:
        return _TOWERS[self.kind].gated_mlp

    @property
    def patch_bias(self) -> bool:
        return _TOWERS[self.kind].patch_bias

    @property
    def window_attention(self) -> bool:
        """Blocks other than fullatt_block_indexes attend within windows of window_size pixels
        (Qwen2.5-VL)."""
        return self.window_size > 0

    def is_full(self, block: int) -> bool:
        """Whether ViT block `block` attends over whole images (else within windows)."""
        return not self.window_attention or block in self.fullatt_block_indexes

    @property
    def window_patches(self) -> int:
        """The most patches of one attention window (its side, in whole merged tokens, times
        the merge size, squared); 0 without window attention."""
        side = self.window_size // self.spatial_merge_size // self.patch_size
        return (side * self.spatial_merge_size) ** 2


@dataclass(frozen=True, kw_only=True)
class V1VisionConfig:
    """Qwen-VL v1: OpenCLIP ViT-bigG at 448 px and the 256-query cross-attention resampler."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    image_start_id: int = 151857
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.width % self.heads:
            raise ConfigError(f"visual width {self.width} is not a multiple of heads {self.heads}")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str
    text: TextConfig
    vision: VisionConfig | V1VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        caps = capabilities(self.family)
        if caps.fixed_size_images != isinstance(self.vision, V1VisionConfig):
            raise ConfigError(
                f"a {self.family} model needs a "
                f"{'V1VisionConfig' if caps.fixed_size_images else 'VisionConfig'}"
            )

    @property
    def capabilities(self) -> Capabilities:
        return capabilities(self.family)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        vcls = V1VisionConfig if capabilities(d["family"]).fixed_size_images else VisionConfig
        return cls(
            **{k: v for k, v in d.items() if k not in ("text", "vision")},
            text=_build(TextConfig, d["text"]),
            vision=_build(vcls, d["vision"]),
        )


def _build(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kw)


def family_of(hf: dict) -> str:
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json is not a JSON object (got a {type(hf).__name__})")
    mt = hf.get("model_type")
    if mt not in _MODEL_TYPE_TO_FAMILY:
        raise ConfigError(
            f"unknown model_type {mt!r} in config.json (supported: {sorted(_MODEL_TYPE_TO_FAMILY)})"
        )
    return _MODEL_TYPE_TO_FAMILY[mt]


def _rope(tc: dict, top: dict) -> tuple[float, dict]:
    """(theta, the rope dict) from rope_parameters (transformers 5) or rope_theta/rope_scaling."""
    rp = dict(tc.get("rope_parameters") or top.get("rope_parameters") or {})
    scaling = tc.get("rope_scaling") or top.get("rope_scaling") or {}
    for k, v in scaling.items():
        rp.setdefault(k, v)
    theta = rp.get("rope_theta", tc.get("rope_theta", top.get("rope_theta")))
    return theta, rp


# config.json keys that the parser divides or multiplies by: checked before it does.
_RAW_NUMBERS = {
    "hidden_size": int,
    "num_attention_heads": int,
    "head_dim": int,
    "kv_channels": int,
    "intermediate_size": int,
    "embed_dim": int,
    "mlp_ratio": float,
    "width": int,
}


def _check_raw(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"config.json: {where} is not a JSON object")
    for key, kind in _RAW_NUMBERS.items():
        v = d.get(key)
        if v is None:
            continue
        ok = isinstance(v, int) if kind is int else isinstance(v, int | float)
        if not ok or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(
                f"config.json: {where}{key} must be a positive {kind.__name__}, got {v!r}"
            )


def from_hf(hf: dict) -> ModelConfig:
    """Parse a Hugging Face config.json dict into a ModelConfig. Values are checked here: a
    missing, mistyped or impossible field is a ConfigError naming it."""
    family = family_of(hf)
    _check_raw(hf, "")
    for sub in ("text_config", "vision_config", "visual"):
        if hf.get(sub) is not None:
            _check_raw(hf[sub], f"{sub}.")
    try:
        if capabilities(family).fixed_size_images:
            return _from_hf_v1(hf)
        return _from_hf_modern(hf, family)
    except KeyError as e:
        raise ConfigError(f"config.json of a {family} model lacks the key {e.args[0]!r}") from None


def _from_hf_modern(hf: dict, family: str) -> ModelConfig:
    # Qwen2/2.5 hub configs are flat (text keys at the top); transformers 5 nests text_config.
    tc = dict(hf)
    tc.update(hf.get("text_config") or {})
    vc = hf["vision_config"]
    theta, rp = _rope(tc, hf)
    heads = tc["num_attention_heads"]
    head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
    qwen3 = family.startswith("qwen3")
    hybrid = family.startswith("qwen3_5")  # Gated DeltaNet + gated attention, (1 + w) norms
    moe = family.endswith("_moe")
    default_theta = 1e7 if hybrid else 5e5 if qwen3 else 1e6
    default_section = (11, 11, 10) if hybrid else (24, 20, 20) if qwen3 else (16, 24, 24)
    layer_types: tuple[str, ...] = ()
    if hybrid:
        layer_types = tuple(tc.get("layer_types") or ())
        if not layer_types:
            interval = tc.get("full_attention_interval", 4)
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise ConfigError(
                    f"full_attention_interval must be a positive int, got {interval!r}"
                )
            layer_types = tuple(
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(tc["num_hidden_layers"])
            )
    moe_hidden = tc.get("moe_intermediate_size", 0) if moe else 0
    shared_hidden = tc.get("shared_expert_intermediate_size", 512) if moe and hybrid else 0
    text = TextConfig(
        vocab_size=tc["vocab_size"],
        hidden_size=tc["hidden_size"],
        # Qwen3.5-MoE has no dense MLP; the field then only needs a positive value
        intermediate_size=tc.get("intermediate_size") or shared_hidden or moe_hidden,
        num_hidden_layers=tc["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=tc.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta if theta is not None else default_theta),
        mrope_section=tuple(rp.get("mrope_section") or default_section),
        mrope_interleaved=qwen3,
        attention_bias=bool(tc.get("attention_bias", not qwen3)),
        qk_norm=qwen3,
        tie_word_embeddings=bool(
            hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
        ),
        max_position_embeddings=tc.get("max_position_embeddings", 32768),
        num_experts=(tc.get("num_experts") or tc.get("num_local_experts") or 0) if moe else 0,
        num_experts_per_tok=tc.get("num_experts_per_tok", 0) if moe else 0,
        moe_intermediate_size=moe_hidden,
        decoder_sparse_step=tc.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(tc.get("mlp_only_layers") or ()),
        router_aux_loss_coef=tc.get("router_aux_loss_coef", 0.001),
        shared_expert_intermediate_size=shared_hidden,
        layer_types=layer_types,
        linear_num_key_heads=tc.get("linear_num_key_heads", 16) if hybrid else 0,
        linear_num_value_heads=tc.get("linear_num_value_heads", 32) if hybrid else 0,
        linear_key_head_dim=tc.get("linear_key_head_dim", 128) if hybrid else 0,
        linear_value_head_dim=tc.get("linear_value_head_dim", 128) if hybrid else 0,
        linear_conv_kernel_dim=tc.get("linear_conv_kernel_dim", 4) if hybrid else 0,
        partial_rotary_factor=float(
            rp.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.25 if hybrid else 1))
        ),
        attn_output_gate=hybrid,
        norm_zero_centered=hybrid,
        mtp_num_hidden_layers=tc.get("mtp_num_hidden_layers", 0) if hybrid else 0,
    )
    kind = "qwen3_vl" if qwen3 else family
    if kind == "qwen2_vl":
        width = vc.get("embed_dim", 1280)
        vision = VisionConfig(
            kind=kind,
            depth=vc["depth"],
            hidden_size=width,
            out_hidden_size=vc.get("hidden_size", text.hidden_size),
            num_heads=vc["num_heads"],
            intermediate_size=int(width * vc.get("mlp_ratio", 4)),
            hidden_act=vc.get("hidden_act", "quick_gelu"),
            **_vision_common(vc),
        )
    else:
        vision = VisionConfig(
            kind=kind,
            depth=vc["depth"],
            hidden_size=vc["hidden_size"],
            out_hidden_size=vc.get("out_hidden_size", text.hidden_size),
            num_heads=vc["num_heads"],
            intermediate_size=vc["intermediate_size"],
            hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh" if qwen3 else "silu"),
            window_size=vc.get("window_size", 112) if kind == "qwen2_5_vl" else 0,
            fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes") or ()),
            tokens_per_second=float(vc.get("tokens_per_second", 2))
            if kind == "qwen2_5_vl"
            else 0.0,
            num_position_embeddings=vc.get("num_position_embeddings", 2304) if qwen3 else 0,
            deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes") or ()),
            **_vision_common(vc),
        )
    return ModelConfig(
        family=family,
        text=text,
        vision=vision,
        **{k: hf.get(k, v) for k, v in (_HYBRID_IDS if hybrid else _QWEN_IDS).items()},
    )


_QWEN_IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
_HYBRID_IDS = dict(
    image_token_id=248056,
    video_token_id=248057,
    vision_start_token_id=248053,
    vision_end_token_id=248054,
)


def _vision_common(vc: dict) -> dict:
    rp = vc.get("rope_parameters") or {}
    return dict(
        patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 14)),
        temporal_patch_size=vc.get("temporal_patch_size", 2),
        spatial_merge_size=vc.get("spatial_merge_size", 2),
        in_channels=vc.get("in_channels", vc.get("in_chans", 3)),
        rope_theta=float(rp.get("rope_theta", 10000.0)),
    )


def _from_hf_v1(hf: dict) -> ModelConfig:
    v = hf["visual"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("kv_channels") or hf["hidden_size"] // heads
    if float(hf.get("rotary_pct", 1.0)) != 1.0:
        raise ConfigError(f"rotary_pct {hf['rotary_pct']} is not supported (only 1.0)")
    text = TextConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"] // 2,
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(hf.get("rotary_emb_base", 10000)),
        mrope_section=(head_dim // 2, 0, 0),  # 1-D RoPE: every frequency reads row 0
        attention_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        rope_in_activation_dtype=False,
        softmax_in_fp32=False,
        use_dynamic_ntk=bool(hf.get("use_dynamic_ntk", False)),
        use_logn_attn=bool(hf.get("use_logn_attn", False)),
        seq_length=hf.get("seq_length", 2048),
    )
    vision = V1VisionConfig(
        image_size=v.get("image_size", 448),
        patch_size=v.get("patch_size", 14),
        width=v["width"],
        layers=v["layers"],
        heads=v["heads"],
        mlp_ratio=v["mlp_ratio"],
        output_dim=v["output_dim"],
        n_queries=v.get("n_queries", 256),
        image_start_id=v.get("image_start_id", 151857),
    )
    # v1 has no video and no per-patch placeholder: image_token_id is <imgpad>, the vision span
    # is <img> ... </img>; -1 never matches a token.
    start = vision.image_start_id
    return ModelConfig(
        family="qwen_vl",
        text=text,
        vision=vision,
        image_token_id=start + 2,
        video_token_id=-1,
        vision_start_token_id=start,
        vision_end_token_id=start + 1,
    )


def load_config(path: str | Path) -> ModelConfig:
    """A ModelConfig from a checkpoint folder, a config.json, or a preset name."""
    p = Path(path)
    if not p.exists() and (PRESET_DIR / f"{path}.json").exists():
        return ModelConfig.from_dict(json.loads((PRESET_DIR / f"{path}.json").read_text()))
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: no config.json (not a checkpoint folder nor a preset name)")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{cfg_file}: not a JSON object (got a {type(d).__name__})")
    if "family" in d and "text" in d:  # our own format (presets, `convert` output)
        return ModelConfig.from_dict(d)
    return from_hf(d)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


__all__ = [
    "BOX_FORMATS",
    "CAPABILITIES",
    "FAMILIES",
    "VIDEO_TIMES",
    "Capabilities",
    "ModelConfig",
    "TextConfig",
    "V1VisionConfig",
    "VisionConfig",
    "capabilities",
    "family_of",
    "from_hf",
    "load_config",
    "presets",
]
