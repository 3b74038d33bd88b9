"""Checkpoint key <-> parameter path tables, one per family, used both ways.

A rule pairs a Hugging Face key template with a parameter path template; `{i}` stands for an
integer (a layer index) and `{p}` for a parameter leaf name. Tensors change layout by the kind of
leaf they land in: a `kernel` is the transpose of a torch Linear weight (and a flattened Conv
weight), an `embedding` is stored as is. Keys are first brought to the names transformers uses in
memory (`model.visual.*`, `model.language_model.*`), so legacy and new checkpoints both load; export
writes the names of the family's hub checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from qwenvl_jax.config import ModelConfig, TextConfig
from qwenvl_jax.errors import CheckpointError

_LEAF = {"weight": "weight", "bias": "bias"}


@dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "model.visual.blocks.{i}.attn.qkv.{p}"
    ours: str  # e.g. "visual.blocks.{i}.attn.qkv.{p}"
    leaf: dict[str, str] | None = None  # hf leaf name -> our leaf name (default: weight->kernel)

    def _regex(self, template: str) -> re.Pattern:
        pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")
        return re.compile(f"^{pat}$")


def _compile(rules: list[Rule]):
    return [(r, r._regex(r.hf), r._regex(r.ours)) for r in rules]


def _fill(template: str, i: str | None, p: str | None) -> str:
    return template.replace("{i}", i or "").replace("{p}", p or "")


# Leaves: a Linear's torch `weight` becomes our `kernel`; norms keep `weight`/`bias`.
LINEAR = {"weight": "kernel", "bias": "bias"}
NORM = {"weight": "weight", "bias": "bias"}
EMBED = {"weight": "embedding"}


def _layer_rules(hf: str, ours: str, text: TextConfig) -> list[Rule]:
    """The rules of a decoder layer's tensors, `hf` and `ours` being the layer's prefixes (with
    `{i}`): attention (full, or Gated DeltaNet where the config has linear layers), norms, and
    the dense or sparse MLP (with a shared expert where the config has one)."""

    def rule(name: str, leaf: dict | None, param: bool = True) -> Rule:
        tail = ".{p}" if param else ""
        return Rule(f"{hf}.{name}{tail}", f"{ours}.{name}{tail}", leaf)

    rules = [rule(n, NORM) for n in ("input_layernorm", "post_attention_layernorm")]
    rules += [rule(f"self_attn.{n}", LINEAR) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    rules += [rule(f"self_attn.{n}", NORM) for n in ("q_norm", "k_norm")]
    rules += [rule(f"mlp.{n}", LINEAR) for n in ("gate_proj", "up_proj", "down_proj")]
    if text.has_linear_layers:
        names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "conv1d")
        rules += [rule(f"linear_attn.{n}", LINEAR) for n in names]
        rules += [rule("linear_attn.norm", NORM)]
        rules += [rule(f"linear_attn.{n}", {}, param=False) for n in ("dt_bias", "A_log")]
    if text.num_experts:
        rules += [
            rule("mlp.gate", LINEAR),
            Rule(f"{hf}.mlp.experts.gate_up_proj", f"{ours}.mlp.gate_up_proj", {}),
            Rule(f"{hf}.mlp.experts.down_proj", f"{ours}.mlp.down_proj", {}),
        ]
    if text.shared_expert_intermediate_size:
        names = ("gate_proj", "up_proj", "down_proj")
        rules += [rule(f"mlp.shared_expert.{n}", LINEAR) for n in names]
        rules += [rule("mlp.shared_expert_gate", LINEAR)]
    return rules


# Checkpoint names of each ViT kind (theirs -> ours): the block MLP's layers, the patch merger's
# layers, and the patch mergers (Qwen3-VL's DeepStack mergers are named like its last one).
_MERGER_QWEN2 = {"ln_q": "norm", "mlp.0": "fc1", "mlp.2": "fc2"}
_VIT_NAMES = {
    "qwen2_vl": ({"fc1": "fc1", "fc2": "fc2"}, _MERGER_QWEN2, ("merger",)),
    "qwen2_5_vl": (
        {n: n for n in ("gate_proj", "up_proj", "down_proj")},
        _MERGER_QWEN2,
        ("merger",),
    ),
    "qwen3_vl": (
        {"linear_fc1": "fc1", "linear_fc2": "fc2"},
        {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"},
        ("merger", "deepstack_merger_list.{i}"),
    ),
}


def _modern_rules(config: ModelConfig) -> list[Rule]:
    text = config.text
    V, L = "model.visual", "model.language_model"
    rules = [
        Rule(f"{V}.patch_embed.proj.{{p}}", "visual.patch_embed.{p}", LINEAR),
        Rule(f"{V}.pos_embed.{{p}}", "visual.pos_embed", {"weight": ""}),
        Rule(f"{V}.blocks.{{i}}.norm1.{{p}}", "visual.blocks.{i}.norm1.{p}", NORM),
        Rule(f"{V}.blocks.{{i}}.norm2.{{p}}", "visual.blocks.{i}.norm2.{p}", NORM),
        Rule(f"{V}.blocks.{{i}}.attn.qkv.{{p}}", "visual.blocks.{i}.attn.qkv.{p}", LINEAR),
        Rule(f"{V}.blocks.{{i}}.attn.proj.{{p}}", "visual.blocks.{i}.attn.proj.{p}", LINEAR),
        Rule(f"{L}.embed_tokens.{{p}}", "language_model.embed_tokens.{p}", EMBED),
        Rule(f"{L}.norm.{{p}}", "language_model.norm.{p}", NORM),
        Rule("lm_head.{p}", "lm_head.{p}", LINEAR),
    ]
    rules += _layer_rules(f"{L}.layers.{{i}}", "language_model.layers.{i}", text)
    if text.mtp_num_hidden_layers:
        # Multi-token prediction (Qwen3.5): full-attention layers, stored as they are named.
        mtp_text = dataclasses.replace(text, layer_types=())
        rules += [Rule("mtp.fc.{p}", "mtp.fc.{p}", LINEAR)]
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            rules.append(Rule(f"mtp.{n}.{{p}}", f"mtp.{n}.{{p}}", NORM))
        rules += _layer_rules("mtp.layers.{i}", "mtp.layers.{i}", mtp_text)
    mlp, merger, mergers = _VIT_NAMES[config.vision.kind]
    rules += [
        Rule(f"{V}.blocks.{{i}}.mlp.{hf}.{{p}}", f"visual.blocks.{{i}}.mlp.{ours}.{{p}}", LINEAR)
        for hf, ours in mlp.items()
    ]
    rules += [
        Rule(f"{V}.{m}.{hf}.{{p}}", f"visual.{m}.{ours}.{{p}}", NORM if ours == "norm" else LINEAR)
        for m in mergers
        for hf, ours in merger.items()
    ]
    return rules


def _to_kernel(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).T if a.ndim > 1 else a


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


class RegexMapping(Mapping):
    # Buffers some checkpoints carry that hold no parameters.
    ignored = (r"rotary_emb\.inv_freq$",)

    def __init__(self, config: ModelConfig):
        self.family = config.family
        self.hub_legacy_names = self.family in ("qwen2_vl", "qwen2_5_vl")
        self.rules = _compile(_modern_rules(config))
        v = config.vision
        self.conv_shape = (
            v.hidden_size,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        )

    @staticmethod
    def canonical(key: str) -> str:
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

    def import_tensor(self, key, array, target_shape):
        ck = self.canonical(key)
        for rule, hf_re, _ in self.rules:
            m = hf_re.match(ck)
            if not m:
                continue
            i, p = m.groupdict().get("i"), m.groupdict().get("p")
            leaf = (rule.leaf or {}).get(p, p) if p is not None else None
            if p is not None and leaf is None:
                break
            path = _fill(rule.ours, i, leaf).rstrip(".")
            shape = target_shape(path)
            if leaf == "kernel":
                array = _to_kernel(array)
            elif array.ndim == 3 and tuple(array.shape) != tuple(shape):
                array = np.swapaxes(array, 1, 2)  # experts stored (E, out, in)
            return [(path, array)]
        raise CheckpointError(f"checkpoint key {key!r} maps to no parameter of {self.family}")

    def export_tensors(self, params):
        inverse = {}
        for rule, _, ours_re in self.rules:
            inverse_leaf = {v: k for k, v in (rule.leaf or {}).items()}
            inverse[rule.ours] = (rule, ours_re, inverse_leaf)
        for path, array in params.items():
            for rule, ours_re, inv in inverse.values():
                if "{p}" not in rule.ours:
                    if path != _fill(rule.ours, None, None) and not ours_re.match(path):
                        continue
                    m = ours_re.match(path)
                    i = m.groupdict().get("i") if m else None
                    p = next(iter(inv.values()), None) if inv else None
                    key = _fill(rule.hf, i, p)
                    yield self.hub_name(key), array
                    break
                m = ours_re.match(path)
                if not m:
                    continue
                i, leaf = m.groupdict().get("i"), m.groupdict()["p"]
                p = inv.get(leaf, leaf)
                key = _fill(rule.hf, i, p)
                out = array
                if leaf == "kernel":
                    out = array.T
                    if path == "visual.patch_embed.kernel":
                        out = out.reshape(self.conv_shape)
                    elif path.endswith("linear_attn.conv1d.kernel"):
                        out = out[:, None, :]  # depthwise Conv1d weight [C, 1, K]
                yield self.hub_name(key), out
                break
            else:
                raise CheckpointError(f"parameter {path} has no checkpoint name in {self.family}")


def mapping_for(config: ModelConfig) -> Mapping:
    if config.family == "qwen_vl":
        from qwenvl_jax.loading.mapping_v1 import V1Mapping

        return V1Mapping(config)
    return RegexMapping(config)
