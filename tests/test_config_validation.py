"""A broken config.json is refused where it is parsed, in one line that names the problem: not a
JSON object, or a field with an impossible value. Through `from_pretrained`, `generate` and
`train`, each ends with exit status 2 and nothing written."""

from __future__ import annotations

import json

import pytest

import qwenvl_jax as qj
from qwenvl_jax.cli import main
from qwenvl_jax.config import from_hf, load_config
from qwenvl_jax.errors import ConfigError
from tests.hf_models import hf_config

NOT_OBJECTS = {"list": [1, 2, 3], "string": "text", "number": 7}


def _good() -> dict:
    return hf_config("qwen2_5_vl").to_dict()


def _with(section: str, key: str, value) -> dict:
    d = _good()
    (d[section] if section else d)[key] = value
    return d


BAD_VALUES = {
    "zero heads": (("text_config", "num_attention_heads", 0), "num_attention_heads"),
    "text width": (("text_config", "hidden_size", "eighty"), "hidden_size"),
    "negative layers": (("text_config", "num_hidden_layers", -2), "num_hidden_layers"),
    "boolean vocab": (("text_config", "vocab_size", True), "vocab_size"),
    "vision heads": (("vision_config", "num_heads", 0), "num_heads"),
    "vision depth": (("vision_config", "depth", "two"), "depth"),
    "uneven kv heads": (("text_config", "num_key_value_heads", 3), "num_key_value_heads"),
    "vision section": (("", "vision_config", [1]), "vision_config"),
}


def _folder(tmp_path, content) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(content))
    return str(folder)


def test_the_good_config_parses():
    cfg = from_hf(_good())
    assert cfg.family == "qwen2_5_vl" and cfg.text.num_attention_heads == 4


@pytest.mark.parametrize("name", sorted(NOT_OBJECTS))
def test_a_config_that_is_not_an_object_is_refused(tmp_path, name):
    folder = _folder(tmp_path, NOT_OBJECTS[name])
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_config(folder)
    with pytest.raises(ConfigError, match="not a JSON object"):
        from_hf(NOT_OBJECTS[name])


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_impossible_values_name_the_field(name):
    (section, key, value), field = BAD_VALUES[name]
    with pytest.raises(ConfigError, match=field):
        from_hf(_with(section, key, value))


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err


@pytest.mark.parametrize(
    "content, expected",
    [
        ([1, 2, 3], "not a JSON object"),
        ("text", "not a JSON object"),
        (_with("text_config", "num_attention_heads", 0), "num_attention_heads"),
        (_with("text_config", "hidden_size", "eighty"), "hidden_size"),
    ],
    ids=["list", "string", "zero-heads", "eighty"],
)
def test_generate_train_and_from_pretrained_refuse_in_one_line(tmp_path, capsys, content, expected):
    folder = _folder(tmp_path, content)
    with pytest.raises(ConfigError, match=expected):
        qj.from_pretrained(folder)
    with pytest.raises(ConfigError, match=expected):
        qj.from_pretrained(folder, abstract=True)
    _one_line_error(capsys, ["generate", "--model", folder, "--prompt", "hi"], expected)
    work = tmp_path / "work"
    argv = ["train", "--workdir", str(work), f"model={folder}", "stage=2", "data.train=synthetic"]
    _one_line_error(capsys, argv, expected)
    assert not work.exists() or not any(work.iterdir())
