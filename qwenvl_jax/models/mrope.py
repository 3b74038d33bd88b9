"""M-RoPE position ids (t, h, w) for the Qwen2/2.5/3-VL decoders, computed on the host.

Per sequence, with padding removed by the attention mask: a text token advances every axis by 1;
an image or video item of merged grid (T', H', W') gets t = cur + floor(i * interval),
h = cur + row, w = cur + col, and the text after it starts at the item's largest position + 1 (the
rule of the released checkpoints; transformers 5 uses cur + max(H', W') instead, which differs for
Qwen2/2.5 videos whose scaled temporal index exceeds max(H', W')). How a video's t advances is the
family's `video_time` capability: by temporal patch ("index"), by seconds times tokens_per_second
("seconds"), or every temporal patch its own item ("timestamps": texts in between separate them).
"""

from __future__ import annotations

import numpy as np

from qwenvl_jax.config import ModelConfig


def _items(cfg: ModelConfig, grid: np.ndarray | None, video: bool, spg: np.ndarray | None):
    """(T', H', W', interval) per vision item of one kind, in order."""
    m = cfg.vision.spatial_merge_size
    video_time = cfg.capabilities.video_time
    out = []
    for i, (t, h, w) in enumerate(np.asarray(grid if grid is not None else np.zeros((0, 3)))):
        t, h, w = int(t), int(h) // m, int(w) // m
        if video and video_time == "timestamps":
            out += [(1, h, w, 1.0)] * t
        elif video and video_time == "seconds":
            s = float(spg[i]) if spg is not None else 1.0
            out.append((t, h, w, s * cfg.vision.tokens_per_second))
        else:
            out.append((t, h, w, 1.0))
    return out


def get_rope_index(
    cfg: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids int[B, T] -> (position_ids int32[3, B, T], rope_deltas int32[B]).

    Padded positions get 1 on every axis. rope_delta = max(position) + 1 - T: during decoding the
    token in cache slot s has position s + rope_delta on all three axes.
    """
    ids = np.asarray(input_ids)
    B, T = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    images = _items(cfg, image_grid_thw, False, None)
    videos = _items(cfg, video_grid_thw, True, second_per_grid_ts)
    queues = {cfg.image_token_id: iter(images), cfg.video_token_id: iter(videos)}
    pos = np.ones((3, B, T), np.int64)
    deltas = np.zeros(B, np.int64)
    for b in range(B):
        valid = np.nonzero(mask[b] == 1)[0]
        seq = ids[b, valid]
        out = np.zeros((3, len(seq)), np.int64)
        cur, i = 0, 0
        while i < len(seq):
            tok = int(seq[i])
            if tok in queues:
                try:
                    t, h, w, interval = next(queues[tok])
                except StopIteration:
                    raise ValueError(
                        "more vision tokens in input_ids than the grids describe"
                    ) from None
                n = t * h * w
                if i + n > len(seq) or np.any(seq[i : i + n] != tok):
                    raise ValueError(f"a vision item of {n} tokens does not match input_ids")
                tt = (np.arange(t) * interval).astype(np.int64)
                grid = np.stack(np.meshgrid(tt, np.arange(h), np.arange(w), indexing="ij"))
                out[:, i : i + n] = cur + grid.reshape(3, -1)
                cur = cur + int(grid.max()) + 1
                i += n
            else:
                out[:, i] = cur
                cur += 1
                i += 1
        pos[:, b, valid] = out
        deltas[b] = (out.max() + 1 if out.size else 0) - T
    for kind, q in queues.items():
        if next(q, None) is not None:
            what = "image" if kind == cfg.image_token_id else "video"
            raise ValueError(f"fewer {what} tokens in input_ids than the {what} grids describe")
    return pos.astype(np.int32), deltas.astype(np.int32)
