"""Host-side metadata for the native-resolution ViTs, computed in numpy from the grids.

Everything that depends on the image sizes is computed here, once, on the host, so that the jitted
tower sees only fixed-shape arrays: the patches padded to a bucket, the (h, w) rotary positions in
merge-block order, the segment ids (one per image or video frame; one per window for Qwen2.5's
window layers), the window permutation and its inverse, and Qwen3's bilinear position-table taps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qwenvl_jax.config import VisionConfig


def bucket(n: int, minimum: int = 64, steps: int = 8) -> int:
    """The padded size for n: `minimum`, or above it the next of `steps` evenly spaced sizes
    between two powers of two (64, 72, 80, ..., 128, 144, ...), so padding adds less than
    1 / steps (12.5%) and every size in a bucket shares one compiled program. With a power-of-two
    minimum of at least 4 * steps, each bucket is a multiple of 4 (whole 2 x 2 merge blocks)."""
    if n <= minimum:
        return minimum
    step = max((1 << (n - 1).bit_length()) // (2 * steps), 1)  # (next power of two) / 16
    return -(-n // step) * step


class VisionBatch(NamedTuple):
    """All images, then all videos, of one forward call, flattened into one padded patch list.

    pixels float[N, patch_dim]; pos_hw int32[2, N]; segment_ids / window_segment_ids int32[N]
    (0 = padding); perm int32[N] (processing order of the patches); unperm int32[N/m^2] (merged
    tokens back to raster order); interp_idx int32[N, 4], interp_w float32[N, 4] (Qwen3 only, else
    zero-size); video_offset int32[] (index of the first video token among the merged tokens).
    """

    pixels: np.ndarray
    pos_hw: np.ndarray
    segment_ids: np.ndarray
    window_segment_ids: np.ndarray
    perm: np.ndarray
    unperm: np.ndarray
    interp_idx: np.ndarray
    interp_w: np.ndarray
    video_offset: np.ndarray


def _merge_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of an h x w grid in merge-block-major order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blk = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return blk(rows), blk(cols)


def _window_order(t: int, h: int, w: int, m: int, win: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL windows over the merged grid of one item: (merged-token order, window id of each
    merged token in that order). The pad is always at least one window when a side divides."""
    gh, gw = h // m, w // m
    idx = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = win - gh % win, win - gw % win
    padded = np.full((t, gh + ph, gw + pw), -1)
    padded[:, :gh, :gw] = idx
    nh, nw = (gh + ph) // win, (gw + pw) // win
    padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    order, wid = [], []
    for k, window in enumerate(padded):
        keep = window[window >= 0]
        order.append(keep)
        wid.append(np.full(len(keep), k))
    return np.concatenate(order), np.concatenate(wid)


def _bilinear_taps(h: int, w: int, m: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """align_corners=True bilinear taps into a side x side table for each patch of an h x w grid,
    in merge-block order: int32[h*w, 4], float32[h*w, 4]."""
    rows, cols = _merge_order(h, w, m)

    def axis(i, size):
        src = i.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        f = np.floor(src)
        taps = np.stack([f, f + 1], -1).astype(np.int64)
        dist = np.abs(src[:, None] - f[:, None] - np.array([0, 1], np.float32))
        return np.clip(taps, 0, side - 1), np.clip(1 - dist, 0, None).astype(np.float32)

    ht, hw = axis(rows, h)
    wt, ww = axis(cols, w)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx.astype(np.int32), wts.astype(np.float32)


def make_vision_batch(
    cfg: VisionConfig,
    pixel_values: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    pad_to: int | None = None,
) -> VisionBatch | None:
    grids, pix = [], []
    n_image_patches = 0
    if pixel_values is not None and image_grid_thw is not None and len(image_grid_thw):
        grids += [tuple(int(v) for v in g) for g in np.asarray(image_grid_thw)]
        pix.append(np.asarray(pixel_values))
        n_image_patches = int(np.prod(np.asarray(image_grid_thw), axis=1).sum())
    if pixel_values_videos is not None and video_grid_thw is not None and len(video_grid_thw):
        grids += [tuple(int(v) for v in g) for g in np.asarray(video_grid_thw)]
        pix.append(np.asarray(pixel_values_videos))
    if not grids:
        return None
    pixels = np.concatenate(pix, axis=0)
    m = cfg.spatial_merge_size
    unit = m * m
    n = int(sum(t * h * w for t, h, w in grids))
    if pixels.shape[0] != n:
        raise ValueError(f"pixel rows ({pixels.shape[0]}) do not match the grids ({n} patches)")
    N = pad_to or bucket(n)
    if n > N or N % unit:
        raise ValueError(f"cannot pad {n} patches to {N}")

    win = cfg.window_size // m // cfg.patch_size  # merged tokens per window side
    pos, seg, wseg, merged_order = [], [], [], []
    frame, window, offset = 0, 0, 0
    for t, h, w in grids:
        rows, cols = _merge_order(h, w, m)
        item_pos = np.stack([np.tile(rows, t), np.tile(cols, t)])  # [2, t*h*w]
        item_seg = np.repeat(np.arange(frame + 1, frame + t + 1), h * w)
        frame += t
        if cfg.window_attention:
            order, wid = _window_order(t, h, w, m, win)
            window_of_token = wid + window + 1
            window += int(wid.max()) + 1
        else:
            order = np.arange(t * h * w // unit)
            window_of_token = item_seg[::unit]
        patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        pos.append(item_pos[:, patch_order])
        seg.append(item_seg[patch_order])
        wseg.append(np.repeat(window_of_token, unit))
        merged_order.append(order + offset // unit)
        offset += t * h * w

    merged = np.concatenate(merged_order)
    perm = np.concatenate([(merged[:, None] * unit + np.arange(unit)).reshape(-1), np.arange(n, N)])
    unperm = np.concatenate([np.argsort(merged), np.arange(n // unit, N // unit)])
    pad = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (N - n,), a.dtype)], axis=-1)
    if cfg.num_position_embeddings:
        side = int(round(cfg.num_position_embeddings**0.5))
        taps = [_bilinear_taps(h, w, m, side) for t, h, w in grids for _ in range(t)]
        idx = np.concatenate([np.concatenate([a for a, _ in taps]), np.zeros((N - n, 4), np.int32)])
        wts = np.concatenate(
            [np.concatenate([b for _, b in taps]), np.zeros((N - n, 4), np.float32)]
        )
    else:
        idx, wts = np.zeros((N, 0), np.int32), np.zeros((N, 0), np.float32)
    pixels = np.concatenate([pixels, np.zeros((N - n, pixels.shape[1]), pixels.dtype)])
    return VisionBatch(
        pixels=pixels,
        pos_hw=pad(np.concatenate(pos, axis=1)).astype(np.int32),
        segment_ids=pad(np.concatenate(seg)).astype(np.int32),
        window_segment_ids=pad(np.concatenate(wseg)).astype(np.int32),
        perm=perm.astype(np.int32),
        unperm=unperm.astype(np.int32),
        interp_idx=idx,
        interp_w=wts,
        video_offset=np.asarray(n_image_patches // unit, np.int32),
    )


def stack_groups(groups: list[VisionBatch]) -> VisionBatch:
    """G equally padded VisionBatches as one with a leading group axis on every field."""
    return VisionBatch(*(np.stack(values) for values in zip(*groups, strict=True)))


def is_grouped(batch: VisionBatch) -> bool:
    """Whether the batch carries a leading group axis (a training batch)."""
    return np.ndim(batch.segment_ids) == 2
