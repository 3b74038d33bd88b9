"""Packing examples into fixed-shape batches (the contract of batch.py).

`Packer` fills one batch first-fit: each example goes into the first of the B rows with room for
its tokens, as long as the vision budget has room for its media: `max_images` for the batch
(Qwen-VL v1), or `max_patches` ViT patches split evenly over `groups` groups of B / groups rows
(the rows of one group share their group's patches; the groups are what the vision tower splits
over the data axes of the mesh). Each sample keeps its own positions and gets the next segment
id of its row; its patches keep the segment ids `make_vision_batch` gives per image / frame.

`PackIterDataset` runs a Packer over a Grain iterator of examples. An example that does not fit
the current batch waits for the next one (at most `max_pending` wait; then the batch is emitted);
waiting examples are placed first. Its state is the parent's state before the oldest waiting
example plus one flag per element read since (waiting or done), so a restored iterator re-reads
those elements and continues exactly where the saved one was. Each output element is
`(batch, stats)`: the batch dict and the DataStats (as a dict) of the elements it consumed.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.data.batch import V1_PIXELS, empty_vision_batch, vision_fields
from qwenvl_jax.data.stats import DataStats, SampleError
from qwenvl_jax.data.transforms import Example, Skipped
from qwenvl_jax.models.vision_inputs import VisionBatch, make_vision_batch, stack_groups

logger = logging.getLogger(__name__)


class Packer:
    """One batch being filled: B rows of L tokens and the vision budget."""

    def __init__(
        self,
        model_config: ModelConfig,
        batch_size: int,
        seq_len: int,
        *,
        max_patches: int = 0,
        max_images: int = 0,
        groups: int = 1,
    ) -> None:
        self.config = model_config
        self.fixed_images = model_config.capabilities.fixed_size_images
        self.batch_size, self.seq_len = batch_size, seq_len
        self.max_patches, self.max_images = max_patches, max_images
        unit = 1 if self.fixed_images else model_config.vision.spatial_merge_size**2
        if groups < 1 or batch_size % groups or max_patches % (unit * groups):
            raise ValueError(
                f"{groups} vision groups must divide the {batch_size} rows, and max_patches "
                f"({max_patches}) into multiples of {unit}"
            )
        self.groups = groups
        self.group_patches = max_patches // groups  # each group's share of the patch budget
        self.rows: list[list[Example]] = [[] for _ in range(batch_size)]
        self.free = [seq_len] * batch_size
        self.patches = [0] * groups
        self.images = 0

    @property
    def empty(self) -> bool:
        return not any(self.rows)

    @property
    def full(self) -> bool:
        return not any(self.free)

    def fits(self, example: Example) -> bool:
        """Whether the example could go into an empty batch."""
        return (
            example.num_tokens <= self.seq_len
            and example.num_patches <= self.group_patches
            and example.num_images <= self.max_images
        )

    def add(self, example: Example) -> bool:
        """Place the example in the first row with room; False when it does not fit."""
        if self.images + example.num_images > self.max_images:
            return False
        n, per_group = example.num_tokens, self.batch_size // self.groups
        for row, free in enumerate(self.free):
            g = row // per_group
            if n <= free and self.patches[g] + example.num_patches <= self.group_patches:
                self.rows[row].append(example)
                self.free[row] -= n
                self.patches[g] += example.num_patches
                self.images += example.num_images
                return True
        return False

    def build(self) -> dict[str, np.ndarray]:
        """The batch dict (see batch.py)."""
        B, L = self.batch_size, self.seq_len
        input_ids = np.zeros((B, L), np.int32)
        segment_ids = np.zeros((B, L), np.int32)
        position_ids = np.zeros((3, B, L), np.int32)
        targets = np.zeros((B, L), np.int32)
        loss_mask = np.zeros((B, L), np.float32)
        for b, row in enumerate(self.rows):
            at = 0
            for s, ex in enumerate(row, start=1):
                n = ex.num_tokens
                input_ids[b, at : at + n] = ex.input_ids
                segment_ids[b, at : at + n] = s
                position_ids[:, b, at : at + n] = ex.position_ids
                targets[b, at : at + n - 1] = ex.input_ids[1:]
                loss_mask[b, at : at + n - 1] = ex.target_mask[1:]
                at += n
        batch = {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "position_ids": position_ids,
            "targets": targets,
            "loss_mask": loss_mask,
        }
        batch.update(self._vision())
        return batch

    def _vision(self) -> dict[str, np.ndarray]:
        examples = [ex for row in self.rows for ex in row]  # row-major token order
        if self.fixed_images:
            if not self.max_images:
                return {}
            size = self.config.vision.image_size
            pixels = np.zeros((self.max_images, 3, size, size), np.float32)
            k = 0
            for ex in examples:
                if ex.num_images:
                    pixels[k : k + ex.num_images] = ex.pixel_values
                    k += ex.num_images
            return {V1_PIXELS: pixels}
        if not self.max_patches:
            return {}
        per_group = self.batch_size // self.groups
        groups = [
            self._group_vision([ex for row in self.rows[g : g + per_group] for ex in row])
            for g in range(0, self.batch_size, per_group)
        ]
        return vision_fields(stack_groups(groups))

    def _group_vision(self, examples: list[Example]) -> VisionBatch:
        """One group's media in row-major token order, padded to the group's budget."""
        parts: dict[str, list[np.ndarray]] = {
            k: []
            for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        }
        for ex in examples:
            for key, items in parts.items():
                value = getattr(ex, key)
                if value is not None and len(value):
                    items.append(value)
        cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        if cat["image_grid_thw"] is None and cat["video_grid_thw"] is None:
            return empty_vision_batch(self.config.vision, self.group_patches)
        return make_vision_batch(
            self.config.vision,
            cat["pixel_values"],
            cat["image_grid_thw"],
            cat["pixel_values_videos"],
            cat["video_grid_thw"],
            pad_to=self.group_patches,
        )


class PackIterDataset(grain.IterDataset):
    """Examples (or Skipped markers) in, `(batch, stats)` out; see the module docstring."""

    def __init__(
        self,
        parent: grain.IterDataset,
        model_config: ModelConfig,
        batch_size: int,
        seq_len: int,
        *,
        max_patches: int = 0,
        max_images: int = 0,
        groups: int = 1,
        max_pending: int | None = None,
        max_consecutive_skips: int = 1000,
    ) -> None:
        super().__init__(parent)
        self.packer_args = dict(
            model_config=model_config,
            batch_size=batch_size,
            seq_len=seq_len,
            max_patches=max_patches,
            max_images=max_images,
            groups=groups,
        )
        self.max_pending = batch_size if max_pending is None else max_pending
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return "PackIterDataset"


class _Read:
    """An element read since the oldest waiting one: the parent's state before reading it, and
    the example while it waits (None once placed, or for a skipped element)."""

    __slots__ = ("state", "example")

    def __init__(self, state: Any, example: Example | None) -> None:
        self.state, self.example = state, example


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset) -> None:
        super().__init__(parent)
        self._ds = ds
        self._window: list[_Read] = []
        self._exhausted = False
        self._consecutive_skips = 0

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        packer = Packer(**self._ds.packer_args)
        stats = DataStats()
        for read in self._window:
            if read.example is not None and packer.add(read.example):
                read.example = None
                stats.samples += 1
        waiting = sum(read.example is not None for read in self._window)
        while waiting < self._ds.max_pending and not packer.full and not self._exhausted:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            read = _Read(state, None)
            self._window.append(read)
            if isinstance(element, Skipped):
                stats.skip(element.reason)
                self._count_skip(element)
                continue
            self._consecutive_skips = 0
            if packer.add(element):
                stats.samples += 1
            elif packer.fits(element):
                read.example = element
                waiting += 1
            else:  # the transform checks sizes; this guards a config mismatch
                raise SampleError(
                    "too_long",
                    f"an example of {element.num_tokens} tokens and "
                    f"{element.num_patches} patches cannot fit any batch",
                )
        while self._window and self._window[0].example is None:
            self._window.pop(0)
        if packer.empty:
            raise StopIteration
        batch = packer.build()
        stats.batches = 1
        stats.slots = batch["segment_ids"].size
        stats.tokens = int(np.count_nonzero(batch["segment_ids"]))
        return batch, stats.to_dict()

    def _count_skip(self, skipped: Skipped) -> None:
        self._consecutive_skips += 1
        if self._consecutive_skips >= self._ds.max_consecutive_skips:
            raise SampleError(
                skipped.reason,
                f"the last {self._consecutive_skips} samples were "
                f"all skipped; the last one: {skipped.where}: {skipped.message}",
            )

    def get_state(self) -> dict[str, Any]:
        start = self._window[0].state if self._window else self._parent.get_state()
        return {
            "parent": start,
            "waiting": [int(r.example is not None) for r in self._window],
            "exhausted": int(self._exhausted and not self._window),
            "consecutive_skips": self._consecutive_skips,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window = []
        self._exhausted = bool(state["exhausted"])
        for flag in state["waiting"]:
            before = self._parent.get_state()
            element = next(self._parent)
            if flag and not isinstance(element, Example):
                raise ValueError("the data pipeline does not match the saved iterator state")
            self._window.append(_Read(before, element if flag else None))
        self._consecutive_skips = int(state["consecutive_skips"])
