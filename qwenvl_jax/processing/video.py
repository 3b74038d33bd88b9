"""Video input for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: PyAV decoding, frame sampling, resizing.

HF's video processors need torchvision, so their rules are reproduced here in numpy:
- frame sampling at `fps` frames per second (default 2, the qwen-vl-utils convention), clamped to
  [min_frames, max_frames]: Qwen2/2.5 use `Qwen2VLVideoProcessor.sample_frames` (a multiple of
  temporal_patch_size, indices `arange(0, n, n/k)` truncated), Qwen3 uses
  `Qwen3VLVideoProcessor.sample_frames` (`linspace(0, n-1, k)` rounded);
- the size every frame is resized to: `smart_resize` with the per-frame pixel cap of qwen-vl-utils
  (HF's `cap_pixels_per_frame=True`), in the 2-D (Qwen2/2.5) or 3-D (Qwen3) form;
- Qwen3's frame timestamps and Qwen2.5's `second_per_grid_ts = temporal_patch_size / sampled_fps`.
Frames are resized with PIL bicubic, like images (HF's torchvision resize is not bit-identical).
A list of frames is taken as already sampled, at `fps` frames per second (default 2.0 as in
qwen-vl-utils).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any, Literal

import av
import numpy as np

from qwenvl_jax.config import capabilities
from qwenvl_jax.errors import InputError
from qwenvl_jax.processing.image import (
    ImageInput,
    MissingMediaError,
    PixelConfig,
    load_image,
    patchify,
    rescale_and_normalize,
    resize,
    smart_resize,
)

logger = logging.getLogger(__name__)

SamplingRule = Literal["qwen2", "qwen3"]


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Video preprocessing settings: the pixel pipeline plus frame sampling and pixel budget."""

    pixels: PixelConfig
    rule: SamplingRule
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = True
    max_video_tokens: int = 128000

    @classmethod
    def defaults(cls, family: str) -> VideoConfig:
        """HF's video-processor class defaults for a family, except that frames are sampled at
        2 fps for Qwen2/2.5 too (HF's Qwen2VLVideoProcessor keeps every frame unless asked) and
        the qwen-vl-utils pixel cap is on (`cap_pixels_per_frame`, off unless asked in HF). The
        family's `video_sampling` capability picks them."""
        if capabilities(family).video_sampling == "qwen3":
            pixels = PixelConfig(
                patch_size=16,
                min_pixels=128 * 32 * 32,
                max_pixels=32 * 32 * 768,
                image_mean=(0.5, 0.5, 0.5),
                image_std=(0.5, 0.5, 0.5),
            )
            return cls(pixels=pixels, rule="qwen3", max_video_tokens=768)
        pixels = PixelConfig(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)
        return cls(pixels=pixels, rule="qwen2", max_video_tokens=128000)

    def updated(self, d: Mapping[str, Any]) -> VideoConfig:
        """This config with the keys of an HF video (or image) preprocessor config applied."""
        changes: dict[str, Any] = {"pixels": self.pixels.updated(d)}
        for key, cast in (
            ("fps", float),
            ("min_frames", int),
            ("max_frames", int),
            ("max_video_tokens", int),
            ("do_sample_frames", bool),
            ("cap_pixels_per_frame", bool),
        ):
            if d.get(key) is not None:
                changes[key] = cast(d[key])
        return replace(self, **changes)


@dataclass
class VideoFrames:
    """Frames taken from a clip, with the timing that token layout and M-RoPE need."""

    frames: np.ndarray  # uint8[T, H, W, 3]
    fps: float  # frame rate of the source clip
    indices: np.ndarray | None = (
        None  # int64[T]: index of each frame in the source (default 0..T-1)
    )
    total_frames: int = 0  # frames in the source clip (default T)

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = np.arange(len(self.frames))
        self.indices = np.asarray(self.indices, dtype=np.int64)
        if not self.total_frames:
            self.total_frames = len(self.frames)

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (HF's `VideoMetadata.sampled_fps`)."""
        return len(self.indices) / self.total_frames * self.fps


VideoInput = str | os.PathLike | Sequence[ImageInput] | np.ndarray | VideoFrames


def sample_indices_qwen2(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
) -> np.ndarray:
    """Frame indices the way HF's Qwen2VLVideoProcessor samples them (Qwen2-VL, Qwen2.5-VL).

    The count is `total/video_fps*fps` clamped to [min_frames, max_frames] and to the clip, then
    floored to a multiple of temporal_patch_size (or `num_frames` rounded to one). Indices are
    `arange(0, total, total/count)` evaluated in float32 and truncated, as torch does.
    """
    tps = temporal_patch_size
    if num_frames is not None:
        count = round(num_frames / tps) * tps
    elif fps is not None:
        top = math.floor(min(max_frames, total_frames) / tps) * tps
        count = min(max(total_frames / video_fps * fps, min_frames), top, total_frames)
        count = math.floor(count / tps) * tps
    else:
        return np.arange(total_frames)
    if count > total_frames or count <= 0:
        raise InputError(
            f"cannot sample {count} frames from a video of {total_frames} frames "
            f"(temporal patch size {tps})"
        )
    step = total_frames / count
    length = math.ceil(total_frames / step)
    return (np.arange(length, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def sample_indices_qwen3(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> np.ndarray:
    """Frame indices the way HF's Qwen3VLVideoProcessor samples them: count
    `int(total/video_fps*fps)` clamped to [min_frames, max_frames] and to the clip, indices
    `linspace(0, total-1, count)` rounded half to even."""
    if num_frames is None and fps is not None:
        num_frames = int(total_frames / video_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, min_frames), max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)


def sample_indices(
    total_frames: int,
    video_fps: float,
    cfg: VideoConfig,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
) -> np.ndarray:
    """Frame indices for a clip under the family's rule; `fps`/`num_frames` override the config."""
    if not cfg.do_sample_frames and fps is None and num_frames is None:
        return np.arange(total_frames)
    fps = cfg.fps if fps is None and num_frames is None else fps
    kwargs = dict(fps=fps, num_frames=num_frames, min_frames=cfg.min_frames)
    kwargs["max_frames"] = cfg.max_frames
    if cfg.rule == "qwen3":
        return sample_indices_qwen3(total_frames, video_fps, **kwargs)
    tps = cfg.pixels.temporal_patch_size
    return sample_indices_qwen2(total_frames, video_fps, temporal_patch_size=tps, **kwargs)


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = 128 * 128,
    max_pixels: int = 16 * 16 * 2 * 2 * 2 * 6144,
) -> tuple[int, int]:
    """Qwen3-VL's 3-D `smart_resize`: like `smart_resize`, with the pixel limits applied to the
    whole clip (frames * height * width); sides below `factor` are first scaled up."""
    if num_frames < temporal_factor:
        raise InputError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise InputError(f"video aspect ratio must be at most 200, got {ratio:g}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_resize_target(
    num_frames: int, height: int, width: int, cfg: VideoConfig
) -> tuple[int, int]:
    """The (height, width) every frame of a `num_frames` clip is resized to."""
    v = cfg.pixels
    factor, tps = v.factor, v.temporal_patch_size
    if cfg.rule == "qwen3":
        num_frames = max(num_frames, tps)  # HF raises below tps; a padded clip is what we encode
        max_pixels = v.max_pixels
        if cfg.cap_pixels_per_frame:
            per_frame = min(cfg.max_video_tokens * factor * factor, v.max_pixels // num_frames)
            max_pixels = max(per_frame, int(v.min_pixels * 1.05)) * num_frames
        return smart_resize_video(num_frames, height, width, tps, factor, v.min_pixels, max_pixels)
    max_pixels = v.max_pixels
    if cfg.cap_pixels_per_frame:
        total_pixels = int(cfg.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(
            min(max_pixels, total_pixels * tps // num_frames), int(v.min_pixels * 1.05)
        )
    return smart_resize(height, width, factor, v.min_pixels, max_pixels)


def frame_timestamps(
    indices: Sequence[int], fps: float, temporal_patch_size: int = 2
) -> list[float]:
    """Seconds at the middle of each temporal patch (Qwen3-VL's `<t seconds>` prompt text): the
    indices are padded with the last one to a multiple of temporal_patch_size, and each group's
    first and last timestamps are averaged."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    seconds = [i / fps for i in idx]
    k = temporal_patch_size
    return [(seconds[i] + seconds[i + k - 1]) / 2 for i in range(0, len(seconds), k)]


def open_video(source: str | os.PathLike | IO[bytes], name: str) -> av.container.InputContainer:
    """An open PyAV container with at least one video stream (use it in a `with` block).

    A still image (PNG, JPEG, WebP, ... which FFmpeg would read as a one-frame clip) is refused,
    as is anything FFmpeg cannot open; the InputError names the file as `name`."""
    try:
        container = av.open(source)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot read video {name}: {e}") from None
    fmt = container.format.name
    problem = None
    if fmt.endswith("_pipe") or fmt.startswith("image2"):
        kind = fmt.removesuffix("_pipe").upper()
        problem = f"a still image ({kind}), not a video; give it as an image"
    elif not container.streams.video:
        problem = "no video stream"
    if problem is not None:
        container.close()
        raise InputError(f"cannot read video {name}: {problem}")
    return container


def read_video(
    path: str | os.PathLike,
    cfg: VideoConfig,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
) -> VideoFrames:
    """Decode the sampled frames of a video file with PyAV (first video stream, RGB24)."""
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not os.path.isfile(path):
        raise MissingMediaError(f"video file not found: {path}")
    with open_video(path, path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 24.0
        total = stream.frames
        try:
            if total <= 0:
                total = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(0)
            if total <= 0:
                raise InputError(f"cannot read video {path}: no frames")
            try:
                indices = sample_indices(total, video_fps, cfg, fps=fps, num_frames=num_frames)
            except InputError as e:
                raise InputError(f"cannot read video {path}: {e}") from None
            wanted, last = set(indices.tolist()), int(indices.max())
            decoded: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except av.FFmpegError as e:
            raise InputError(f"cannot decode video {path}: {e}") from None
    if not decoded:
        raise InputError(f"cannot decode video {path}: no frames decoded")
    if len(decoded) < len(wanted):
        logger.warning("%s: container reports %d frames, fewer were decoded", path, total)
    frames, latest = [], decoded[min(decoded)]
    for i in indices.tolist():
        latest = decoded.get(i, latest)
        frames.append(latest)
    return VideoFrames(np.stack(frames), video_fps, indices, total)


def frames_from_list(frames: Sequence[ImageInput] | np.ndarray, fps: float = 2.0) -> VideoFrames:
    """Already-sampled frames (paths, PIL images or `uint8[H, W, C]` arrays, or one
    `uint8[T, H, W, C]` array) taken at `fps` frames per second."""
    if len(frames) == 0:
        raise InputError("a video given as a list of frames needs at least one frame")
    rgb = [load_image(f) for f in frames]
    shapes = {f.shape for f in rgb}
    if len(shapes) > 1:
        raise InputError(f"all frames of a video must have the same size, got {sorted(shapes)}")
    return VideoFrames(np.stack(rgb), float(fps))


def load_video(
    video: VideoInput,
    cfg: VideoConfig,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
) -> VideoFrames:
    """Any accepted video input as sampled frames. For a file, `fps`/`num_frames` choose the
    sampling; for frames given directly, `fps` is the rate they were taken at."""
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        return read_video(video, cfg, fps=fps, num_frames=num_frames)
    if isinstance(video, (list, tuple, np.ndarray)):
        return frames_from_list(video, fps=2.0 if fps is None else fps)
    raise InputError(f"unsupported video input of type {type(video).__name__}")


def preprocess_video(
    video: VideoFrames, cfg: VideoConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Sampled frames to `float32[gt*gh*gw, C*tps*P*P]` patches and the grid `(gt, gh, gw)`."""
    v = cfg.pixels
    n, h, w = video.frames.shape[:3]
    th, tw = video_resize_target(n, h, w, cfg) if v.do_resize else (h, w)
    pixels = np.stack(
        [
            rescale_and_normalize(resize(f, th, tw, v.resample) if v.do_resize else f, v)
            for f in video.frames
        ]
    )
    return patchify(pixels, v.patch_size, v.merge_size, v.temporal_patch_size)
