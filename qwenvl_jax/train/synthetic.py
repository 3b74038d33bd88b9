"""Synthetic training batches that follow the batch contract (qwenvl_jax/data/batch.py).

`data.train: synthetic` trains on them: each batch is a pure function of (seed, index), so runs
are reproducible and the iterator state is one integer. Every row packs one or two samples of
prompt text, an image (random patches) and an answer; the loss counts the answer tokens. Used by
the tests, the benchmark and smoke runs; real data goes through qwenvl_jax.data.pipeline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qwenvl_jax.config import ModelConfig, V1VisionConfig
from qwenvl_jax.data.batch import V1_PIXELS, empty_vision_batch, row_axis, vision_fields
from qwenvl_jax.models.mrope import get_rope_index
from qwenvl_jax.models.vision_inputs import make_vision_batch, stack_groups

# image grids (h, w) in patches, multiples of the 2x2 merge
GRIDS = ((4, 4), (2, 4), (4, 2), (2, 2))


class SyntheticBatches:
    """An endless iterator of contract batches with Grain-like `get_state` / `set_state`.

    distinct > 0 cycles through that many different batches (distinct=1: one fixed batch, to
    overfit); 0 makes every batch new. images=False gives text-only batches.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        distinct: int = 0,
        images: bool = True,
        max_patches: int | None = None,
        answer_len: int = 6,
        groups: int = 1,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.config = config
        self.B, self.L = batch_size, seq_len
        self.seed, self.distinct, self.images = seed, distinct, images
        self.answer_len = answer_len
        self.v1 = isinstance(config.vision, V1VisionConfig)
        self.max_images = 2 * batch_size if images and self.v1 else 0
        self.max_patches = 0
        if images and not self.v1:
            self.max_patches = max_patches or 2 * batch_size * max(h * w for h, w in GRIDS)
        if batch_size % groups or self.max_patches % (4 * groups):
            raise ValueError(f"{groups} vision groups do not divide the batch and its patches")
        self.groups = groups  # the batch's patches in groups of B / groups rows (data/batch.py)
        if batch_size % process_count or groups % process_count:
            raise ValueError(f"{process_count} processes do not divide the batch and its groups")
        self.process = (process_index, process_count)  # this process feeds its share of rows
        self.index = 0

    # -- Grain-style iterator protocol --------------------------------------------------------
    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        i = self.index % self.distinct if self.distinct else self.index
        self.index += 1
        return self.local(self.batch(i))

    def local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's share of a global batch, as the data pipeline gives it: its rows and
        their patch groups, or for Qwen-VL v1 its rows' pictures, then padding."""
        p, n = self.process
        if n == 1:
            return batch
        out = {}
        for key, value in batch.items():
            if key == V1_PIXELS:
                continue
            axis = row_axis(key)
            size = value.shape[axis] // n
            out[key] = np.take(value, np.arange(p * size, (p + 1) * size), axis=axis)
        if V1_PIXELS in batch:
            hits = batch["input_ids"] == self.config.vision.image_start_id
            rows = self.B // n
            before = int(np.sum(hits[: p * rows]))
            mine = int(np.sum(hits[p * rows : (p + 1) * rows]))
            pixels = batch[V1_PIXELS]
            out[V1_PIXELS] = np.zeros((len(pixels) // n, *pixels.shape[1:]), pixels.dtype)
            out[V1_PIXELS][:mine] = pixels[before : before + mine]
        return out

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    # -- batches -------------------------------------------------------------------------------
    def _ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # plain text ids: below every special id of the tiny and the real vocabularies
        cfg = self.config
        special = cfg.vision.image_start_id if self.v1 else cfg.image_token_id
        top = min(cfg.text.vocab_size, 151643, special - 8) - 16
        return rng.integers(16, max(top, 17), n)

    def _sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Any]:
        """(ids, loss_mask over targets, image) of one sample; image: (grid, pixels) or None."""
        prompt = self._ids(rng, int(rng.integers(3, 7)))
        answer = self._ids(rng, self.answer_len)
        cfg = self.config
        image, vis = None, np.zeros(0, np.int64)
        if self.images and self.v1:
            v = cfg.vision
            start = v.image_start_id
            vis = np.concatenate([[start], np.full(v.n_queries, start + 2), [start + 1]])
            image = ((), rng.standard_normal((3, v.image_size, v.image_size)).astype(np.float32))
        elif self.images:
            h, w = GRIDS[int(rng.integers(len(GRIDS)))]
            n = h * w // cfg.vision.spatial_merge_size**2
            vis = np.concatenate(
                [
                    [cfg.vision_start_token_id],
                    np.full(n, cfg.image_token_id),
                    [cfg.vision_end_token_id],
                ]
            )
            pixels = rng.standard_normal((h * w, cfg.vision.patch_dim)).astype(np.float32)
            image = ((1, h, w), pixels)
        ids = np.concatenate([vis, prompt, answer]).astype(np.int64)
        # position t predicts ids[t + 1]; count the predictions of answer tokens
        mask = np.zeros(len(ids), np.float32)
        mask[len(ids) - len(answer) - 1 : len(ids) - 1] = 1
        return ids, mask, image

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        B, L, cfg = self.B, self.L, self.config
        out = {
            "input_ids": np.zeros((B, L), np.int32),
            "segment_ids": np.zeros((B, L), np.int32),
            "position_ids": np.zeros((3, B, L), np.int32),
            "targets": np.zeros((B, L), np.int32),
            "loss_mask": np.zeros((B, L), np.float32),
        }
        images = []
        rows_per_group = B // self.groups
        used = [0] * self.groups  # patches of each group so far (a row stops at its budget)
        for b in range(B):
            at = 0
            for seg in (1, 2):
                ids, mask, image = self._sample(rng)
                n = len(ids)
                g = b // rows_per_group
                patches = 0 if image is None or self.v1 else len(image[1])
                if at + n > L or (seg == 2 and rng.random() < 0.3):
                    break
                if self.max_patches and used[g] + patches > self.max_patches // self.groups:
                    break
                used[g] += patches
                sl = slice(at, at + n)
                out["input_ids"][b, sl] = ids
                out["segment_ids"][b, sl] = seg
                out["targets"][b, at : at + n - 1] = ids[1:]
                out["loss_mask"][b, sl] = mask
                if self.v1 or image is None:
                    out["position_ids"][:, b, sl] = np.arange(n)
                else:
                    grid = np.asarray([image[0]])
                    pos, _ = get_rope_index(cfg, ids[None], None, grid)
                    out["position_ids"][:, b, sl] = pos[:, 0]
                if image is not None:
                    images.append((b, image))
                at += n
        if self.v1 and self.max_images:
            v = cfg.vision
            pix = np.zeros((self.max_images, 3, v.image_size, v.image_size), np.float32)
            for k, (_, (_, p)) in enumerate(images):
                pix[k] = p
            out[V1_PIXELS] = pix
        elif self.max_patches:
            rows, size = B // self.groups, self.max_patches // self.groups
            groups = []
            for g in range(self.groups):
                mine = [im for b, im in images if b // rows == g]
                if mine:
                    grids = np.asarray([grid for grid, _ in mine])
                    pixels = np.concatenate([p for _, p in mine])
                    groups.append(make_vision_batch(cfg.vision, pixels, grids, pad_to=size))
                else:
                    groups.append(empty_vision_batch(cfg.vision, size))
            out.update(vision_fields(stack_groups(groups)))
        return out


__all__ = ["SyntheticBatches"]
