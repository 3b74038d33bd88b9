"""`qwenvl-jax generate`: --greedy --json token ids equal transformers' greedy `generate` for one
and two images per family, the checkpoint's generation_config.json defaults (a repetition penalty)
against transformers' `generate()` defaults, streamed text, --draw, and one line with exit status 2
for each kind of bad input. The CLI runs in-process (`qwenvl_jax.cli.main`), once as a real
subprocess."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl_jax as qj
from qwenvl_jax.cli import main
from qwenvl_jax.commands.generate import build_messages, draw_boxes, input_size_fn
from tests.checkpoints import (
    load_hf,
    make_checkpoint,
    session_checkpoint,
    v1_checkpoint,
    v1_scenarios,
)
from tests.test_generation_config import PENALIZED, narrow_vocabulary

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
NEW_TOKENS = 24
REPO = Path(__file__).resolve().parents[1]


def picture(folder: Path, name: str, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    path = folder / name
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli_media")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a picture" * 10)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 20)
    return {
        "wide": picture(d, "wide.png", (100, 70), 1),
        "tall": picture(d, "tall.png", (60, 90), 2),
        "big": picture(d, "big.png", (512, 256), 3),
        "square1": picture(d, "square1.png", (256, 256), 4),
        "square2": picture(d, "square2.png", (256, 256), 5),
        "corrupt_image": str(d / "corrupt.png"),
        "corrupt_video": str(d / "corrupt.mp4"),
        "dir": str(d),
    }


def cases(family: str, media: dict) -> dict[str, dict]:
    qwen3 = family.startswith("qwen3")
    return {
        "one": dict(images=[media["big" if qwen3 else "wide"]], prompt="Describe this picture."),
        "two": dict(
            images=[media["square1"], media["square2"]]
            if qwen3
            else [media["wide"], media["tall"]],
            prompt="What differs between these two pictures?",
            system="You are a careful assistant.",
        ),
    }


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(folder: Path, case: dict, *extra: str) -> list[str]:
    args = [
        "--model",
        str(folder),
        "--prompt",
        case["prompt"],
        "--max-new-tokens",
        str(NEW_TOKENS),
        *extra,
    ]
    for image in case["images"]:
        args += ["--image", image]
    if case.get("system"):
        args += ["--system", case["system"]]
    return args


@functools.lru_cache(maxsize=1)
def hf_model(folder: Path, family: str):
    return load_hf(folder, family)


@functools.lru_cache(maxsize=4)
def processor_of(folder: Path):
    return qj.Processor.from_pretrained(folder)


def hf_tokens(folder: Path, family: str, case: dict) -> list[int]:
    processor = processor_of(folder)
    messages = build_messages(case["images"], [], case["prompt"], case.get("system"))
    inputs = processor(messages)
    with torch.no_grad():
        out = hf_model(folder, family).generate(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=processor.pad_token_id,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_json_matches_hf_generate(family, media, tmp_path_factory, capsys):
    folder = session_checkpoint(family, tmp_path_factory)
    for name, case in cases(family, media).items():
        code, out, err = run_cli(capsys, *cli_args(folder, case, "--json", "--greedy"))
        assert code == 0, err
        result = json.loads(out)
        assert set(result) == {"text", "token_ids", "prompt_tokens", "timings"}
        assert set(result["timings"]) == {"compile_s", "prefill_s", "decode_tokens_per_s"}
        assert result["timings"]["decode_tokens_per_s"] > 0
        ref = hf_tokens(folder, family, case)
        assert len(ref) == NEW_TOKENS, name
        assert result["token_ids"] == ref, name
        processor = processor_of(folder)
        assert result["text"] == processor.decode(ref)
        messages = build_messages(case["images"], [], case["prompt"], case.get("system"))
        assert result["prompt_tokens"] == processor(messages)["input_ids"].shape[1]


def test_qwen_vl_v1_json_matches_the_original_code(tmp_path_factory, capsys):
    folder = v1_checkpoint(tmp_path_factory)
    s = next(s for s in v1_scenarios() if s["name"] == "coffee_grounding")
    content = s["messages"][0]["content"]
    code, out, err = run_cli(
        capsys,
        "--model",
        str(folder),
        "--image",
        content[0]["image"],
        "--prompt",
        content[1]["text"],
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
        "--greedy",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == s["greedy"]["token_ids"]
    assert result["prompt_tokens"] == s["n_tokens"]


def test_streams_the_text(media, tmp_path_factory, capsys):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    case = cases("qwen2_vl", media)["one"]
    code, out, err = run_cli(capsys, *cli_args(folder, case, "--greedy"))
    assert code == 0, err
    processor = processor_of(folder)
    assert out == processor.decode(hf_tokens(folder, "qwen2_vl", case)) + "\n"


def test_defaults_from_generation_config_and_greedy(media, tmp_path_factory, capsys):
    """A folder whose generation_config.json asks for greedy decoding with a 1.05 repetition
    penalty: without flags the CLI decodes so, as transformers' generate() does with its defaults;
    --greedy decodes plainly; --repetition-penalty wins over the file."""
    folder = make_checkpoint("qwen2_vl", tmp_path_factory.mktemp("penalized"), generation=PENALIZED)
    processor = qj.Processor.from_pretrained(folder)
    case = dict(images=[media["wide"]], prompt="Say it again and again: la la la, do re mi.")
    messages = build_messages(case["images"], [], case["prompt"])
    inputs = processor(messages)
    stop = {*processor.eos_token_ids, processor.image_token_id}
    narrow_vocabulary(
        folder, set(inputs["input_ids"].ravel().tolist()) - stop | {*range(1000, 1700, 7)}
    )
    hf = load_hf(folder, "qwen2_vl")
    assert hf.generation_config.repetition_penalty == 1.05

    def hf_ids(**kw) -> list[int]:
        with torch.no_grad():
            out = hf.generate(
                **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                max_new_tokens=NEW_TOKENS,
                **kw,
            )
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def cli_ids(*extra: str) -> list[int]:
        code, out, err = run_cli(capsys, *cli_args(folder, case, "--json", *extra))
        assert code == 0, err
        return json.loads(out)["token_ids"]

    defaults = cli_ids()
    greedy = cli_ids("--greedy")
    assert defaults == hf_ids() and len(defaults) == NEW_TOKENS
    assert greedy == hf_ids(repetition_penalty=1.0)
    assert len(set(greedy)) < len(greedy) and greedy != defaults  # the penalty is at work
    assert cli_ids("--greedy", "--repetition-penalty", "1.05") == defaults
    assert cli_ids("--repetition-penalty", "1") == greedy


def test_draw_writes_the_image(media, tmp_path_factory, tmp_path, capsys):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    case = cases("qwen2_vl", media)["one"]
    target = tmp_path / "boxes.png"
    code, _, err = run_cli(capsys, *cli_args(folder, case, "--json", "--draw", str(target)))
    assert code == 0, err
    with Image.open(target) as drawn, Image.open(case["images"][0]) as original:
        assert drawn.size == original.size


@pytest.mark.parametrize(
    "family, answer, box",
    [
        # Qwen2.5-VL: pixels of the resized 112 x 56 input of a 100 x 70 picture
        (
            "qwen2_5_vl",
            '```json\n[{"bbox_2d": [28, 14, 84, 42], "label": "cat"}]\n```',
            (25, 18, 75, 52),
        ),
        # Qwen3-VL: 0-1000 relative
        ("qwen3_vl", '[{"bbox_2d": [250, 250, 750, 750], "label": "cat"}]', (25, 17, 75, 52)),
        # Qwen2-VL: 0-1000 relative in box tags
        (
            "qwen2_vl",
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>",
            (25, 17, 75, 52),
        ),
    ],
)
def test_draw_boxes_in_each_convention(family, answer, box, media, tmp_path_factory, tmp_path):
    folder = session_checkpoint(family, tmp_path_factory)
    processor = processor_of(folder)
    target = tmp_path / "drawn.png"
    n = draw_boxes(media["wide"], answer, family, str(target), input_size_fn(processor, family))
    assert n == 1
    with Image.open(target) as drawn, Image.open(media["wide"]) as original:
        changed = np.any(np.asarray(drawn) != np.asarray(original.convert("RGB")), axis=-1)
    rows, cols = np.nonzero(changed)
    x1, y1, x2, y2 = box
    assert abs(cols.min() - x1) <= 2 and abs(cols.max() - x2) <= 2
    assert abs(rows.min() - y1) <= 2 and abs(rows.max() - y2) <= 2


def bad_inputs(folder: Path, media: dict, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a word the error line must contain)."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    broken_config = tmp / "broken_config"
    broken_config.mkdir(exist_ok=True)
    (broken_config / "config.json").write_text("{not json")
    truncated = tmp / "truncated"
    if not truncated.exists():
        shutil.copytree(folder, truncated)
        weights = next(truncated.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ok = ["--model", str(folder), "--prompt", "Hi"]
    return {
        "missing image": (ok + ["--image", str(tmp / "nope.png")], "nope.png"),
        "corrupt image": (ok + ["--image", media["corrupt_image"]], "corrupt.png"),
        "missing video": (ok + ["--video", str(tmp / "nope.mp4")], "nope.mp4"),
        "corrupt video": (ok + ["--video", media["corrupt_video"]], "corrupt.mp4"),
        "missing folder": (["--model", str(tmp / "nowhere"), "--prompt", "Hi"], "nowhere"),
        "folder without config": (["--model", str(empty), "--prompt", "Hi"], "config.json"),
        "broken config": (["--model", str(broken_config), "--prompt", "Hi"], "config.json"),
        "truncated weights": (["--model", str(truncated), "--prompt", "Hi"], "safetensors"),
        "prompt too long": (["--model", str(folder), "--prompt", "hello " * 5000], "tokens"),
        "draw without image": (ok + ["--draw", str(tmp / "x.png")], "--image"),
        "greedy with temperature": (ok + ["--greedy", "--temperature", "0.7"], "--temperature"),
        "bad repetition penalty": (ok + ["--repetition-penalty", "0"], "repetition_penalty"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing image",
        "corrupt image",
        "missing video",
        "corrupt video",
        "missing folder",
        "folder without config",
        "broken config",
        "truncated weights",
        "prompt too long",
        "draw without image",
        "greedy with temperature",
        "bad repetition penalty",
    ],
)
def test_bad_input_exits_2_with_one_line(name, media, tmp_path_factory, capsys):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    tmp = tmp_path_factory.getbasetemp() / "cli_bad_inputs"
    tmp.mkdir(exist_ok=True)
    argv, word = bad_inputs(folder, media, tmp)[name]
    capsys.readouterr()  # what writing the checkpoint printed
    code, out, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("qwenvl-jax generate: error: ")
    assert word in lines[0]
    assert out == ""


def test_subprocess_bad_input_one_line(tmp_path_factory, tmp_path):
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenvl_jax.cli",
            "generate",
            "--model",
            str(folder),
            "--image",
            str(tmp_path / "missing.png"),
            "--prompt",
            "Hi",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"qwenvl-jax generate: error: image file not found: {tmp_path / 'missing.png'}"
    ]
