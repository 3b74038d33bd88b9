"""Checkpoint key <-> parameter path tables, one per family, read one way to import and the other
way to export.

A table is a list of entries `Entry(hub key template, kind, our path templates)` (`{i}` stands for
a layer index), built from the config, in the order export writes them. The kind says how a
stored tensor becomes our parameter(s); each kind is an import function and its exact inverse for
export:
- `SAME`: stored as is (norms, embeddings, position tables, Gated DeltaNet's `dt_bias`/`A_log`);
- `T`: a torch Linear weight [out, in], our kernel [in, out];
- `conv(tail)`: a Conv weight [out, *tail], our kernel [prod(tail), out]: the Conv3d patch
  embedding [W, C, T, P, P], Gated DeltaNet's depthwise Conv1d [C, 1, K], v1's Conv2d [W, 3, P, P];
- `SPLIT_T` / `SPLIT`: a weight (or bias) packing several of our kernels (biases) in row blocks;
- `EXPERTS`: fused MoE experts, kept in the hub layout ((E, H, 2I) and (E, I, H)); a checkpoint
  holding them the other way round in the last two dimensions (what transformers 5's
  save_pretrained writes) is turned on import, decided by the target shape.
The modern families' keys are first brought to the names transformers uses in memory
(`model.visual.*`, `model.language_model.*`), so legacy and new checkpoints both load; export
writes the names of the family's hub checkpoints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qwenvl_jax.config import ModelConfig, TextConfig, VisionConfig
from qwenvl_jax.errors import CheckpointError

Shape = tuple[int, ...]


class LayoutError(ValueError):
    """A checkpoint tensor that does not have the layout of its entry's kind."""


@dataclass(frozen=True)
class Kind:
    """A layout kind: `to_ours(tensor, target shapes)` gives our parameter(s) of one checkpoint
    tensor, `to_hub(parameters)` the checkpoint tensor back."""

    name: str
    to_ours: Callable[[np.ndarray, Sequence[Shape]], list[np.ndarray]]
    to_hub: Callable[[Sequence[np.ndarray]], np.ndarray]


def _split(a: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
    if a.shape[0] % len(shapes):
        raise LayoutError(f"does not pack {len(shapes)} equal q/k/v blocks")
    return np.split(a, len(shapes), axis=0)


def _experts_to_ours(a: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
    if a.ndim == 3 and tuple(a.shape) != tuple(shapes[0]):
        turned = np.swapaxes(a, 1, 2)
        if tuple(turned.shape) == tuple(shapes[0]):
            return [turned]
    return [a]


SAME = Kind("same", lambda a, shapes: [a], lambda parts: parts[0])
T = Kind("t", lambda a, shapes: [a.T], lambda parts: parts[0].T)
SPLIT = Kind("split", _split, lambda parts: np.concatenate(parts, axis=0))
SPLIT_T = Kind(
    "split_t",
    lambda a, shapes: [b.T for b in _split(a, shapes)],
    lambda parts: np.concatenate([p.T for p in parts], axis=0),
)
EXPERTS = Kind("experts", _experts_to_ours, lambda parts: parts[0])


def conv(tail: Shape) -> Kind:
    """The kind of a Conv weight [out, *tail] (in channels, then the kernel's extent)."""
    tail = tuple(tail)

    def to_ours(a: np.ndarray, shapes: Sequence[Shape]) -> list[np.ndarray]:
        if tuple(a.shape[1:]) != tail:
            raise LayoutError(f"is not a conv weight [out, {', '.join(map(str, tail))}]")
        return [a.reshape(a.shape[0], math.prod(tail)).T]

    return Kind(f"conv{tail}", to_ours, lambda parts: parts[0].T.reshape(-1, *tail))


@dataclass(frozen=True)
class Entry:
    hub: str  # checkpoint key template, "{i}" = layer index
    kind: Kind
    ours: tuple[str, ...]  # parameter path template(s), one per packed part

    def key(self, i: int | None) -> str:
        return _fill(self.hub, i)

    def paths(self, i: int | None) -> list[str]:
        return [_fill(p, i) for p in self.ours]


def entry(hub: str, kind: Kind, *ours: str) -> Entry:
    return Entry(hub, kind, ours)


def _fill(template: str, i: int | None) -> str:
    return template if i is None else template.replace("{i}", str(i))


# A table: groups of entries, each with the layer index that fills their templates.
Table = list[tuple[Sequence[Entry], int | None]]


class Mapping:
    """Maps checkpoint tensors to parameter paths (`import_tensor`) and back (`export_tensors`).

    `target_shape(path)` is supplied by the loader so layout questions (expert tensors stored
    either way round) are decided by shape.
    """

    family: str

    def import_tensor(
        self, key: str, array: np.ndarray, target_shape: Callable[[str], tuple]
    ) -> list[tuple[str, np.ndarray]]:
        raise NotImplementedError

    def export_tensors(self, params: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """(hub checkpoint key, tensor in the hub layout) for every parameter."""
        raise NotImplementedError

    ignored: tuple[str, ...] = ()

    def is_ignored(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.ignored)


class TableMapping(Mapping):
    """A `Mapping` read off a table of entries. Export writes the entries of the parameters it is
    given (all of them for a whole model, so one parameter's key can be asked for alone), in the
    table's order; an entry packing several parameters needs all of them."""

    def __init__(self, family: str, table: Table):
        self.family = family
        self.entries = [(e, i) for group, i in table for e in group]
        self._by_key = {e.key(i): (e, i) for e, i in self.entries}
        self._by_path = {p: (e, i) for e, i in self.entries for p in e.paths(i)}

    def canonical(self, key: str) -> str:
        """A checkpoint key as the table names it."""
        return key

    def hub_name(self, key: str) -> str:
        """A table key as the family's hub checkpoints name it."""
        return key

    def import_tensor(self, key, array, target_shape):
        found = self._by_key.get(self.canonical(key))
        if found is None:
            raise CheckpointError(f"checkpoint key {key!r} maps to no parameter of {self.family}")
        entry, i = found
        array = np.asarray(array)
        paths = entry.paths(i)
        shapes = [tuple(target_shape(p)) for p in paths]
        try:
            parts = entry.kind.to_ours(array, shapes)
        except LayoutError as e:
            raise CheckpointError(
                f"checkpoint tensor {key!r} of shape {tuple(array.shape)} {e}"
            ) from None
        for path, part, expected in zip(paths, parts, shapes, strict=True):
            if tuple(part.shape) != expected:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} of shape {tuple(array.shape)} does not fit "
                    f"parameter {path} of shape {expected}"
                )
        return list(zip(paths, parts))

    def export_tensors(self, params):
        extra = next((p for p in params if p not in self._by_path), None)
        if extra is not None:
            raise CheckpointError(f"parameter {extra} has no checkpoint name in {self.family}")
        for entry, i in self.entries:
            paths = entry.paths(i)
            missing = [p for p in paths if p not in params]
            if len(missing) == len(paths):
                continue
            if missing:
                raise CheckpointError(
                    f"parameter {missing[0]} is missing (needed for {entry.key(i)})"
                )
            parts = [np.asarray(params[p]) for p in paths]
            yield self.hub_name(entry.key(i)), entry.kind.to_hub(parts)


# ----------------------------------------------------------------------------- modern families


def _linear(hub: str, ours: str, bias: bool) -> list[Entry]:
    """A Linear layer: `hub` and `ours` are the module's names."""
    out = [entry(f"{hub}.weight", T, f"{ours}.kernel")]
    return out + ([entry(f"{hub}.bias", SAME, f"{ours}.bias")] if bias else [])


def _norm(hub: str, ours: str, bias: bool = False) -> list[Entry]:
    """A norm layer (RMSNorm: weight; LayerNorm: weight and bias)."""
    out = [entry(f"{hub}.weight", SAME, f"{ours}.weight")]
    return out + ([entry(f"{hub}.bias", SAME, f"{ours}.bias")] if bias else [])


def _decoder_layer(hub: str, ours: str, text: TextConfig, linear: bool, moe: bool) -> list[Entry]:
    """The entries of one decoder layer, `hub` and `ours` its prefixes (with `{i}`): full or
    Gated DeltaNet (`linear`) attention, norms, and a dense or sparse (`moe`) MLP, with the
    shared expert where the config has one."""

    def lin(name: str, bias: bool = False) -> list[Entry]:
        return _linear(f"{hub}.{name}", f"{ours}.{name}", bias)

    def norm(name: str) -> list[Entry]:
        return _norm(f"{hub}.{name}", f"{ours}.{name}")

    def same(name: str) -> Entry:
        return entry(f"{hub}.{name}", SAME, f"{ours}.{name}")

    out = norm("input_layernorm")
    if linear:
        for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"):
            out += lin(f"linear_attn.{n}")
        dconv = conv((1, text.linear_conv_kernel_dim))
        out.append(
            entry(f"{hub}.linear_attn.conv1d.weight", dconv, f"{ours}.linear_attn.conv1d.kernel")
        )
        out += [same("linear_attn.dt_bias"), same("linear_attn.A_log")]
        out += norm("linear_attn.norm") + lin("linear_attn.out_proj")
    else:
        for n in ("q_proj", "k_proj", "v_proj"):
            out += lin(f"self_attn.{n}", text.attention_bias)
        out += lin("self_attn.o_proj")
        if text.qk_norm:
            out += norm("self_attn.q_norm") + norm("self_attn.k_norm")
    out += norm("post_attention_layernorm")
    if moe:
        out += lin("mlp.gate")
        out += [
            entry(f"{hub}.mlp.experts.{n}", EXPERTS, f"{ours}.mlp.{n}")
            for n in ("gate_up_proj", "down_proj")
        ]
        if text.shared_expert_intermediate_size:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out += lin(f"mlp.shared_expert.{n}")
            out += lin("mlp.shared_expert_gate")
    else:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out += lin(f"mlp.{n}")
    return out


# Checkpoint names of each ViT kind: its block MLP's layers (theirs, ours), and its patch merger's
# norm, fc1 and fc2 (Qwen3-VL's DeepStack mergers are named like its last one).
_MERGER_QWEN2 = ("ln_q", "mlp.0", "mlp.2")
_VIT_NAMES = {
    "qwen2_vl": ((("fc1", "fc1"), ("fc2", "fc2")), _MERGER_QWEN2),
    "qwen2_5_vl": (tuple((n, n) for n in ("gate_proj", "up_proj", "down_proj")), _MERGER_QWEN2),
    "qwen3_vl": (
        (("linear_fc1", "fc1"), ("linear_fc2", "fc2")),
        ("norm", "linear_fc1", "linear_fc2"),
    ),
}


def _vision_table(v: VisionConfig) -> Table:
    V = "model.visual"
    layernorm = v.norm == "layernorm"
    patch = conv((v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    stem = [entry(f"{V}.patch_embed.proj.weight", patch, "visual.patch_embed.kernel")]
    if v.patch_bias:
        stem.append(entry(f"{V}.patch_embed.proj.bias", SAME, "visual.patch_embed.bias"))
    if v.num_position_embeddings:
        stem.append(entry(f"{V}.pos_embed.weight", SAME, "visual.pos_embed"))
    mlp, merger = _VIT_NAMES[v.kind]
    hub, ours = f"{V}.blocks.{{i}}", "visual.blocks.{i}"
    block = _norm(f"{hub}.norm1", f"{ours}.norm1", layernorm)
    block += _norm(f"{hub}.norm2", f"{ours}.norm2", layernorm)
    block += _linear(f"{hub}.attn.qkv", f"{ours}.attn.qkv", True)
    block += _linear(f"{hub}.attn.proj", f"{ours}.attn.proj", True)
    for h, o in mlp:
        block += _linear(f"{hub}.mlp.{h}", f"{ours}.mlp.{o}", True)

    def merger_entries(name: str) -> list[Entry]:
        norm, fc1, fc2 = (f"{V}.{name}.{h}" for h in merger)
        ours = f"visual.{name}"
        out = _norm(norm, f"{ours}.norm", layernorm)
        return out + _linear(fc1, f"{ours}.fc1", True) + _linear(fc2, f"{ours}.fc2", True)

    deepstack = merger_entries("deepstack_merger_list.{i}")
    return [
        (stem, None),
        *[(block, i) for i in range(v.depth)],
        (merger_entries("merger"), None),
        *[(deepstack, i) for i in range(len(v.deepstack_visual_indexes))],
    ]


def modern_table(config: ModelConfig) -> Table:
    """The table of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) or Qwen3.5(-MoE) config, in the
    order of transformers' modules (in-memory names)."""
    text, L = config.text, "model.language_model"
    table = _vision_table(config.vision)
    table.append(
        ([entry(f"{L}.embed_tokens.weight", SAME, "language_model.embed_tokens.embedding")], None)
    )
    kinds = {}
    for i in range(text.num_hidden_layers):
        kind = (text.layer_type(i) == "linear_attention", text.is_moe_layer(i))
        if kind not in kinds:
            kinds[kind] = _decoder_layer(
                f"{L}.layers.{{i}}", "language_model.layers.{i}", text, *kind
            )
        table.append((kinds[kind], i))
    table.append((_norm(f"{L}.norm", "language_model.norm"), None))
    if not text.tie_word_embeddings:
        table.append((_linear("lm_head", "lm_head", False), None))
    if text.mtp_num_hidden_layers:
        # Multi-token prediction (Qwen3.5): full-attention layers, stored as they are named.
        mtp = _linear("mtp.fc", "mtp.fc", False)
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            mtp += _norm(f"mtp.{n}", f"mtp.{n}")
        table.append((mtp, None))
        layer = _decoder_layer(
            "mtp.layers.{i}", "mtp.layers.{i}", text, False, text.num_experts > 0
        )
        table += [(layer, i) for i in range(text.mtp_num_hidden_layers)]
    return table


class ModernMapping(TableMapping):
    """The `Mapping` of Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) and Qwen3.5(-MoE)."""

    # Buffers some checkpoints carry that hold no parameters.
    ignored = (r"rotary_emb\.inv_freq$",)

    def __init__(self, config: ModelConfig):
        self.hub_legacy_names = config.family in ("qwen2_vl", "qwen2_5_vl")
        super().__init__(config.family, modern_table(config))
        # Export in the order transformers' save_pretrained writes tensors (sorted by key): a
        # round trip keeps their order in the file, and with it transformers' float32 results,
        # which depend on where the weights lie in the file.
        self.entries.sort(key=lambda e: self.hub_name(e[0].key(e[1])))

    def canonical(self, key: str) -> str:
        """Legacy (hub Qwen2/2.5) names -> transformers' in-memory names."""
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model.") and not key.startswith(
            ("model.visual.", "model.language_model.")
        ):
            return "model.language_model." + key[len("model.") :]
        return key

    def hub_name(self, key: str) -> str:
        if not self.hub_legacy_names:
            return key
        if key.startswith("model.visual."):
            return key[len("model.") :]
        if key.startswith("model.language_model."):
            return "model." + key[len("model.language_model.") :]
        return key


def mapping_for(config: ModelConfig) -> Mapping:
    if config.family == "qwen_vl":
        from qwenvl_jax.loading.mapping_v1 import V1Mapping

        return V1Mapping(config)
    return ModernMapping(config)
