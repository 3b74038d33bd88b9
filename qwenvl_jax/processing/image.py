"""Image preprocessing for Qwen2-VL, Qwen2.5-VL and Qwen3-VL in numpy and PIL.

The steps and their numerics follow the PIL backend of Hugging Face's `Qwen2VLImageProcessor`
(used by all three families, with Qwen3's own preprocessor_config.json): load as RGB uint8,
`smart_resize` to multiples of patch*merge, PIL bicubic resize on uint8, `x * (1/255)` computed in
float64 and cast to float32, `(x - mean) / std` in float32, then `patchify` in merge-block order.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from qwenvl_jax.errors import InputError

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray


class MissingMediaError(InputError, FileNotFoundError):
    """An image or video file that does not exist."""


@dataclass(frozen=True, kw_only=True)
class PixelConfig:
    """Preprocessing settings read from preprocessor_config.json (image) or
    video_preprocessor_config.json (video). Defaults are those of HF's Qwen2VLImageProcessor."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    def updated(self, d: Mapping[str, Any]) -> PixelConfig:
        """This config with the keys of an HF preprocessor config dict applied.

        Pixel limits come from `size.shortest_edge/longest_edge` (or `size.min_pixels/max_pixels`);
        top-level `min_pixels`/`max_pixels` win over `size`, as in HF's constructor.
        """
        changes: dict[str, Any] = {}
        size = d.get("size") or {}
        for key, field in (
            ("shortest_edge", "min_pixels"),
            ("min_pixels", "min_pixels"),
            ("longest_edge", "max_pixels"),
            ("max_pixels", "max_pixels"),
        ):
            if isinstance(size, Mapping) and size.get(key) is not None:
                changes[field] = int(size[key])
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                changes[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = d[key]
                changes[key] = tuple(float(v) for v in (value if _is_seq(value) else [value] * 3))
        for key in ("rescale_factor",):
            if d.get(key) is not None:
                changes[key] = float(d[key])
        for key in ("resample",):
            if d.get(key) is not None:
                changes[key] = int(d[key])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                changes[key] = bool(d[key])
        return replace(self, **changes)


def _is_seq(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as well as rounding allows.

    Each side is rounded (Python's round-half-even) to a multiple of factor; if the area is then
    too large, both sides are scaled by the same ratio and floored; if too small, scaled and ceiled.
    """
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise InputError(f"image aspect ratio must be at most 200, got {ratio:g}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_OPEN_LOCK = threading.Lock()


def _pil_open(fp: Any, name: str) -> PIL.Image.Image:
    """`PIL.Image.open(fp)` fully loaded. Images of more than `PIL.Image.MAX_IMAGE_PIXELS`
    pixels (PIL's decompression-bomb limit, 178,956,970 unless changed) are refused with an
    InputError instead of PIL's warning (or its error, from twice that size)."""
    image = None
    try:
        # PIL warns (DecompressionBombWarning) from inside `open`; raise it instead. The warning
        # filters are process-wide, so the threads that open images take turns here.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(fp)
        image.load()
    except Exception as e:
        if image is not None:  # a file that fails to decode is closed, not left to the GC
            image.close()
        raise InputError(f"cannot read image {name}: {e}") from None
    return image


def _open_image_file(source: str | os.PathLike) -> PIL.Image.Image:
    path = os.fspath(source)
    if path.startswith(("http://", "https://")):
        raise InputError(f"cannot fetch image {path}: URLs are not supported, download it first")
    if path.startswith("file://"):
        path = path[len("file://") :]
    if path.startswith("data:image/"):
        try:
            data = base64.b64decode(path.split(",", 1)[1])
        except Exception as e:
            raise InputError(f"cannot decode base64 image: {e}") from None
        return _pil_open(io.BytesIO(data), "given as base64 data")
    if not os.path.isfile(path):
        raise MissingMediaError(f"image file not found: {path}")
    return _pil_open(path, path)


def load_image(image: ImageInput) -> np.ndarray:
    """An image as RGB `uint8[H, W, 3]`, the way HF's processor receives it.

    Paths (also `file://` and `data:image/...;base64,` strings) are opened with PIL, turned upright
    by their EXIF orientation and converted with `convert("RGB")` (alpha dropped), like HF's
    `load_image`. PIL images and arrays given directly are composited onto white when they have
    alpha, like HF's `convert_to_rgb`. Arrays must be `uint8[H, W]` or `uint8[H, W, 1|3|4]`.
    """
    if isinstance(image, (str, os.PathLike)):
        with _open_image_file(image) as pil:
            return np.asarray(PIL.ImageOps.exif_transpose(pil).convert("RGB"))
    if isinstance(image, PIL.Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(f"image arrays must be uint8 [H, W, C], got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise InputError(f"image arrays must be [H, W], [H, W, 1|3|4], got {image.shape}")
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255
            return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return image
    raise InputError(f"unsupported image input of type {type(image).__name__}")


def resize(image: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """PIL resize of `uint8[H, W, 3]` to `uint8[height, width, 3]` (bicubic by default)."""
    pil = PIL.Image.fromarray(image)
    return np.asarray(pil.resize((width, height), resample=resample))


def rescale_and_normalize(frames: np.ndarray, cfg: PixelConfig) -> np.ndarray:
    """`uint8[..., H, W, C]` to channels-first `float32[..., C, H, W]`, rescaled and normalised
    with the same float64-then-float32 steps as HF's numpy backend."""
    x = frames.astype(np.float64)
    if cfg.do_rescale:
        x = x * cfg.rescale_factor
    x = x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        x = (x - mean) / std
    return np.moveaxis(x, -1, -3)


def patchify(
    frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut `float32[T, C, H, W]` into flat patches `float32[gt*gh*gw, C*tps*P*P]`.

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame (so an image,
    T=1, becomes tps identical copies). Rows are ordered t, then merge-block row, merge-block
    column, then the merge_size x merge_size patches inside each block, so every merge_size**2
    consecutive rows form one merged token. Each row is laid out (C, tps, P, P). Returns the
    patches and the grid `(gt, gh, gw)` counted in patches before merging.
    """
    t, c, h, w = frames.shape
    if pad := -t % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m, m, C, tps, P, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


def preprocess_image(
    image: ImageInput, cfg: PixelConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image to `float32[gh*gw, C*tps*P*P]` patches and its grid `(1, gh, gw)`."""
    rgb = load_image(image)
    if cfg.do_resize:
        h, w = smart_resize(rgb.shape[0], rgb.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
        rgb = resize(rgb, h, w, cfg.resample)
    pixels = rescale_and_normalize(rgb, cfg)[None]
    return patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def preprocess_images(images: Sequence[ImageInput], cfg: PixelConfig) -> dict[str, np.ndarray]:
    """Images to `pixel_values` `float32[sum(gh*gw), C*tps*P*P]` and `image_grid_thw`
    `int64[n_images, 3]`, concatenated in order, as HF's image processor returns them."""
    patches, grids = [], []
    for image in images:
        p, grid = preprocess_image(image, cfg)
        patches.append(p)
        grids.append(grid)
    return {
        "pixel_values": np.concatenate(patches, axis=0),
        "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
    }
