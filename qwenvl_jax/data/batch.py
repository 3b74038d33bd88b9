"""The training batch contract shared by the data pipeline and the trainer.

A batch is a dict of numpy arrays whose shapes depend only on the run's config (batch size B,
sequence length L, vision budget), so the jitted train step never recompiles:

- `input_ids` int32[B, L]; `segment_ids` int32[B, L] (0 = padding; 1, 2, ... = the samples packed
  into a row, in order);
- `position_ids` int32[3, B, L]: each sample's own M-RoPE positions (`get_rope_index` on the sample
  alone); for Qwen-VL v1 the slot positions 0..len-1, restarting per sample, on all 3 rows;
- `targets` int32[B, L]: the next token of the same sample (0 at a sample's last token and in
  padding); `loss_mask` float32[B, L]: 1 where `targets` is a token that counts for the loss;
- vision, Qwen2/2.5/3-VL: the fields of `VisionBatch` under `vision.`, in G groups
  (`vision.pixels` float32[G, N, patch_dim], `vision.segment_ids` int32[G, N], ...; G x N = the
  run's `max_patches`): group g holds the images then the videos of rows [g B/G, (g+1) B/G) in
  row-major token order, G being the data-parallel shards the tower splits the groups over;
  Qwen-VL v1: `vision.pixel_values` float32[n_images, 3, 448, 448], the images in row-major
  `<img>` order, padded with zeros.
  A text-only run (no vision budget) has no `vision.` keys.

`batch_to_model_inputs` turns a batch into the arguments of `model.forward`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenvl_jax.config import ModelConfig, V1VisionConfig, VisionConfig
from qwenvl_jax.models.vision_inputs import VisionBatch

VISION_PREFIX = "vision."
V1_PIXELS = VISION_PREFIX + "pixel_values"
TEXT_KEYS = ("input_ids", "segment_ids", "position_ids", "targets", "loss_mask")


def row_axis(key: str) -> int:
    """The axis of batch entry `key` that runs over its rows (or patch groups), which processes
    and data shards split: axis 1 of position_ids [3, B, L], axis 0 of every other entry."""
    return 1 if key == "position_ids" else 0


def vision_fields(vision: VisionBatch) -> dict[str, np.ndarray]:
    """A VisionBatch as batch entries `vision.<field>`."""
    return {VISION_PREFIX + name: np.asarray(value) for name, value in vision._asdict().items()}


def empty_vision_batch(cfg: VisionConfig, num_patches: int) -> VisionBatch:
    """A VisionBatch of `num_patches` padding patches (segment id 0 everywhere): the vision input
    of a batch that holds no image, with the same shapes as one that does."""
    unit = cfg.spatial_merge_size**2
    if num_patches <= 0 or num_patches % unit:
        raise ValueError(f"num_patches must be a positive multiple of {unit}, got {num_patches}")
    taps = 4 if cfg.num_position_embeddings else 0
    zeros = np.zeros(num_patches, np.int32)
    return VisionBatch(
        pixels=np.zeros((num_patches, cfg.patch_dim), np.float32),
        pos_hw=np.zeros((2, num_patches), np.int32),
        segment_ids=zeros,
        window_segment_ids=zeros.copy(),
        perm=np.arange(num_patches, dtype=np.int32),
        unperm=np.arange(num_patches // unit, dtype=np.int32),
        interp_idx=np.zeros((num_patches, taps), np.int32),
        interp_w=np.zeros((num_patches, taps), np.float32),
        video_offset=np.asarray(0, np.int32),
    )


def batch_to_model_inputs(batch: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(input_ids int[B, L], segment_ids int[B, L], position_ids int[3, B, L], vision) for
    `model.forward`; vision is a VisionBatch (Qwen2/2.5/3-VL), the pixel array float[n, 3, 448,
    448] (Qwen-VL v1), or None for a text-only batch. Works on numpy and on jax arrays (inside
    jit too): it only regroups entries."""
    if V1_PIXELS in batch:
        vision = batch[V1_PIXELS]
    elif any(key.startswith(VISION_PREFIX) for key in batch):
        vision = VisionBatch(**{name: batch[VISION_PREFIX + name] for name in VisionBatch._fields})
    else:
        vision = None
    return batch["input_ids"], batch["segment_ids"], batch["position_ids"], vision


def padding_share(batch: Mapping[str, Any]) -> float:
    """Share of token slots that hold no sample: 1 - mean(segment_ids > 0)."""
    return 1.0 - float(np.mean(np.asarray(batch["segment_ids"]) > 0))


def batch_spec(
    model_config: ModelConfig,
    batch_size: int,
    seq_len: int,
    max_patches: int = 0,
    max_images: int = 0,
    vision_groups: int = 1,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of every batch entry for a run config: what the trainer can compile for
    before the first batch arrives. `max_patches` (Qwen2/2.5/3-VL) or `max_images` (Qwen-VL v1)
    of 0 means a text-only run; the patches come in `vision_groups` groups."""
    B, L = batch_size, seq_len
    spec = {
        "input_ids": ((B, L), np.dtype(np.int32)),
        "segment_ids": ((B, L), np.dtype(np.int32)),
        "position_ids": ((3, B, L), np.dtype(np.int32)),
        "targets": ((B, L), np.dtype(np.int32)),
        "loss_mask": ((B, L), np.dtype(np.float32)),
    }
    vision = model_config.vision
    if isinstance(vision, V1VisionConfig):
        if max_images:
            size = vision.image_size
            spec[V1_PIXELS] = ((max_images, 3, size, size), np.dtype(np.float32))
    elif max_patches:
        group = empty_vision_batch(vision, max_patches // vision_groups)
        for name, value in vision_fields(group).items():
            spec[name] = ((vision_groups, *value.shape), value.dtype)
    return spec
