"""How the transformer blocks run under training: the rematerialisation policy.

The decoder's layers are stacked and scanned by construction (models/text.py), in training,
prefill and decoding alike, one scan per group of a repeating layer pattern, so XLA compiles the
same layer bodies whatever the depth; `scan_layers` is kept as a training option for old configs
and changes nothing; the modern vision towers' blocks are stacked and scanned the same way
(models/vision.py). The remat policy is a plain attribute (`remat`) of the decoder and of the
vision towers, whose scan bodies (Qwen-VL v1's tower: its blocks one by one) run under it;
`configure` sets it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from qwenvl_jax.layers.remat import POLICIES, check_policy
from qwenvl_jax.models.text import TextModel
from qwenvl_jax.models.vision import VisionTower

BLOCK_LISTS = ("resblocks",)  # per-block lists run under `remat` (Qwen-VL v1's tower)


def _holders(model: nnx.Module) -> list[tuple[nnx.Module, int]]:
    """(module, number of blocks it runs) of every module that runs blocks under `remat`."""
    out = []
    for _, m in nnx.iter_modules(model):
        if isinstance(m, TextModel):
            out.append((m, m.cfg.num_hidden_layers))
        elif isinstance(m, VisionTower):
            out.append((m, m.cfg.depth))
        else:
            for name in BLOCK_LISTS:
                blocks = getattr(m, name, None)
                if isinstance(blocks, nnx.List) and hasattr(m, "remat"):
                    out.append((m, len(blocks)))
    return out


def apply_remat(model: nnx.Module, policy: str) -> int:
    """Run every decoder layer and ViT block under `jax.checkpoint` with `policy` ("none": no
    remat). Returns the number of blocks that run under a policy."""
    check_policy(policy)
    n = 0
    for holder, count in _holders(model):
        holder.remat = policy
        n += 0 if policy == "none" else count
    return n


def configure(model: nnx.Module, remat: str = "none", scan_layers: bool = False) -> dict[str, Any]:
    """Apply the run's remat policy; returns what was changed (for the log). `scan_layers` is
    accepted for old configs: decoder layers are always scanned, `scanned_decoders` counts the
    decoders."""
    del scan_layers
    return {
        "remat_blocks": apply_remat(model, remat),
        "scanned_decoders": sum(isinstance(m, TextModel) for _, m in nnx.iter_modules(model)),
    }


__all__ = ["POLICIES", "apply_remat", "configure"]
