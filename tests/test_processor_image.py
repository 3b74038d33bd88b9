"""Image preprocessing against Hugging Face's PIL-backend Qwen2VL image processor, with the real
Qwen2-VL and Qwen3-VL preprocessor configs, on scikit-image's sample pictures."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as hf_image  # noqa: E402
from processor_fixtures import (
    REFERENCE_CONFIGS,
    hf_image_processor,
    hf_patchify_frames,
    skimage_image,
)
from transformers.image_utils import load_image as load_hf  # noqa: E402

from qwenvl_jax.errors import InputError
from qwenvl_jax.processing.image import (
    MissingMediaError,
    PixelConfig,
    load_image,
    patchify,
    preprocess_images,
    smart_resize,
)

CONFIG_DIRS = {
    "qwen2": REFERENCE_CONFIGS / "Qwen__Qwen2-VL-7B-Instruct",
    "qwen3": REFERENCE_CONFIGS / "Qwen__Qwen3-VL-4B-Instruct",
}
# (input size or None for the original, extra config keys, expected clamp)
CASES = {
    "original": (None, {}, None),
    "max_clamp": (None, {"max_pixels": 96 * 32 * 32}, "max"),
    "min_clamp": ((30, 45), {}, "min"),
    "min_clamp_large": (None, {"min_pixels": 1024 * 1024}, "min"),
}
IMAGES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def _config_dir(name: str) -> Path:
    if not CONFIG_DIRS[name].is_dir():
        pytest.skip(f"{CONFIG_DIRS[name]} is missing")
    return CONFIG_DIRS[name]


def _ours(folder: Path, **overrides) -> PixelConfig:
    config = json.loads((folder / "preprocessor_config.json").read_text())
    return PixelConfig().updated({**config, **overrides})


@pytest.mark.parametrize("family", sorted(CONFIG_DIRS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", IMAGES)
def test_pixel_values_match_hf(family: str, case: str, name: str) -> None:
    folder = _config_dir(family)
    size, overrides, clamp = CASES[case]
    image = PIL.Image.open(skimage_image(name))
    if size is not None:
        image = image.resize((size[1], size[0]), PIL.Image.Resampling.BILINEAR)
    ref = hf_image_processor(folder, **overrides)(images=[image], return_tensors="np")
    cfg = _ours(folder, **overrides)
    got = preprocess_images([image], cfg)

    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    assert got["image_grid_thw"].dtype == np.int64
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    tokens = int(got["image_grid_thw"].prod()) // cfg.merge_size**2
    assert tokens * cfg.merge_size**2 == len(got["pixel_values"])

    # the case really exercises the clamp it is named after
    h, w = image.height, image.width
    rounded = round(h / cfg.factor) * round(w / cfg.factor) * cfg.factor**2
    if clamp == "max":
        assert rounded > cfg.max_pixels
    elif clamp == "min":
        assert rounded < cfg.min_pixels
    else:
        assert cfg.min_pixels <= rounded <= cfg.max_pixels


def test_several_images_concatenate_in_order() -> None:
    folder = _config_dir("qwen3")
    images = [PIL.Image.open(skimage_image(n)) for n in ("chelsea.png", "coffee.png")]
    ref = hf_image_processor(folder)(images=images, return_tensors="np")
    got = preprocess_images(images, _ours(folder))
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["grayscale_pil", "rgba_pil", "rgba_array", "rgb_array", "path"])
def test_input_kinds_match_hf(kind: str) -> None:
    folder = _config_dir("qwen2")
    astronaut = np.asarray(PIL.Image.open(skimage_image("astronaut.png")))[::3, ::3]
    alpha = np.tile(np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8), (len(astronaut), 1))
    rgba = np.dstack([astronaut, alpha])
    image = {
        "grayscale_pil": PIL.Image.open(skimage_image("camera.png")),
        "rgba_pil": PIL.Image.fromarray(rgba),
        "rgba_array": rgba,
        "rgb_array": np.ascontiguousarray(astronaut),
        "path": skimage_image("rocket.jpg"),
    }[kind]
    # HF's processor opens paths with its own `load_image`; its image processor takes the result
    hf_input = load_hf(image) if kind == "path" else image
    ref = hf_image_processor(folder)(images=[hf_input], return_tensors="np")
    got = preprocess_images([image], _ours(folder))
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def test_smart_resize_matches_hf() -> None:
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (27, 28), (28, 42), (4000, 30), (30, 4000), (1080, 1920), (5000, 7000)]
    sizes += [tuple(int(v) for v in rng.integers(10, 3000, size=2)) for _ in range(200)]
    for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 3136, 1003520)):
        for h, w in sizes:
            assert smart_resize(h, w, factor, lo, hi) == hf_image.smart_resize(h, w, factor, lo, hi)


def test_smart_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_patchify_matches_hf_merge_block_order() -> None:
    rng = np.random.default_rng(0)
    cfg = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    for frames in (1, 2, 5):
        x = rng.standard_normal((frames, 3, 16, 24)).astype(np.float32)
        got, grid = patchify(x, 4, 2, 2)
        ref, ref_grid = hf_patchify_frames(list(x), cfg)
        assert grid == ref_grid == ((frames + 1) // 2, 4, 6)
        np.testing.assert_array_equal(got, ref)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(MissingMediaError, match="nope.png") as info:
        load_image(str(missing))
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ValueError)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(InputError, match="broken.jpg") as info:
        load_image(bad)
    assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(skimage_image("astronaut.png")).read_bytes()[:5000])
    message = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_image(truncated)
        except InputError as e:  # not kept: its traceback would keep the opened file alive
            message = str(e)
        gc.collect()
    assert message and "truncated.png" in message and "\n" not in message
    # the file that failed to decode was closed, not left open for the garbage collector
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


def test_images_above_the_pixel_limit_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    """PIL's decompression-bomb limit (made small here): above it PIL would only warn, above
    twice it it raises; both become one InputError naming the file, with no warning."""
    import base64
    import warnings

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 50):  # 1600 pixels: PIL's warning range; 2500: its error range
        path = tmp_path / f"big{side}.png"
        PIL.Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(path)
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        for source, name in ((path, str(path)), (uri, "given as base64 data")):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # any warning fails the test
                with pytest.raises(InputError) as info:
                    load_image(source)
            message = str(info.value)
            assert message.startswith(f"cannot read image {name}: "), message
            assert f"{side * side} pixels" in message and "\n" not in message
    small = tmp_path / "small.png"
    PIL.Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(small)
    assert load_image(small).shape == (30, 30, 3)  # 900 pixels: within the limit


def test_unsupported_array_is_rejected() -> None:
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))
