"""Hostile input to `qwenvl-jax generate`: a still image given as a video, and pictures above
PIL's decompression-bomb limit, each end with exit status 2, one stderr line that names the file,
no Python warning and nothing on stdout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.cli import main
from tests.checkpoints import session_checkpoint


def _picture(path: Path, width: int, height: int) -> Path:
    PIL.Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
    return path


def _generate(capsys, folder: Path, *media: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()  # what building the checkpoint printed
    code = main(["generate", "--model", str(folder), *media, "--prompt", "Hi"])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_png_given_as_a_video_names_the_file(tmp_path_factory, tmp_path, capsys):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    png = _picture(tmp_path / "some.png", 64, 48)
    code, out, err = _generate(capsys, folder, "--video", str(png))
    assert code == 2, err
    assert err == [
        f"qwenvl-jax generate: error: cannot read video {png}: a still image (PNG), not a video; "
        "give it as an image"
    ]
    assert out == ""


@pytest.mark.parametrize("side", [40, 50], ids=["above_warning_size", "above_error_size"])
def test_image_above_the_pixel_limit_is_one_line(
    side, tmp_path_factory, tmp_path, capsys, recwarn, monkeypatch
):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: 1600 and 2500 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    big = _picture(tmp_path / "big.png", side, side)
    code, out, err = _generate(capsys, folder, "--image", str(big))
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"qwenvl-jax generate: error: cannot read image {big}: ")
    assert f"{side * side} pixels" in err[0] and "exceeds limit" in err[0]
    assert out == ""
    assert not [w for w in recwarn if issubclass(w.category, PIL.Image.DecompressionBombWarning)]
