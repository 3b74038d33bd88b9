"""What a wheel carries: every package folder is listed in pyproject.toml, and the shipped configs
(model presets, stage configs, demo configs) are found through the installed package, not through
the repository's layout. .ci/wheel builds and installs the wheel itself and runs it elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import qwenvl_jax.configs as shipped

import qwenvl_jax
from qwenvl_jax.config import presets
from qwenvl_jax.demo.run import load_demo_config
from qwenvl_jax.resources import config_dir
from qwenvl_jax.train.config import stage_config_path

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_folder():
    listed = set(_setuptools()["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "qwenvl_jax").rglob("__init__.py")
    }
    assert on_disk, "no package folders found"
    assert listed == on_disk | {"qwenvl_jax.configs"}


def test_configs_ship_as_package_data():
    assert _setuptools()["package-dir"]["qwenvl_jax.configs"] == "configs"
    patterns = _setuptools()["package-data"]["qwenvl_jax.configs"]
    shipped = {
        p.relative_to(REPO / "configs") for pat in patterns for p in (REPO / "configs").glob(pat)
    }
    every_file = {
        p.relative_to(REPO / "configs")
        for p in (REPO / "configs").rglob("*")
        if p.is_file() and p.suffix in (".json", ".yaml") and "__pycache__" not in p.parts
    }
    assert shipped == every_file and every_file


def test_configs_are_found_through_the_package():
    assert Path(shipped.__file__).parent.resolve() == (REPO / "configs").resolve()
    assert config_dir("models").is_dir()
    assert "qwen3_vl_235b_a22b_instruct" in presets()
    for family in ("qwen_vl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        for stage in (1, 2, 3):
            assert stage_config_path(family, stage).is_file()
    assert set(load_demo_config("qwen_vl")) >= {"model", "data", "train", "stages"}
    # nothing reads the repository layout relative to the package's own files any more
    for py in Path(qwenvl_jax.__file__).parent.rglob("*.py"):
        assert '/ "configs"' not in py.read_text(), py
