"""Text tokenizer for the Qwen2/2.5/3-VL checkpoints: `tokenizer.json` through the `tokenizers`
library, with the special tokens, padding side and clean-up flag of tokenizer_config.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from qwenvl_jax.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# HF's Qwen2Tokenizer defaults, used for keys tokenizer_config.json does not set.
_DEFAULT_SPECIAL_TOKENS = {
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"))
_CLEAN_UP += ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _token_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _load_backend(
    file: Path, added_tokens: Mapping[str, Mapping[str, Any]] | None, special: Sequence[str]
) -> tokenizers.Tokenizer:
    """tokenizer.json as a `tokenizers.Tokenizer`. Like transformers 5, the added tokens are those
    of tokenizer_config.json's `added_tokens_decoder` when it has one (tokenizer.json's own list
    is then replaced), and every special token is an added special token."""
    try:
        if not added_tokens:
            backend = tokenizers.Tokenizer.from_file(str(file))
        else:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            data["added_tokens"] = [
                {
                    "id": int(token_id),
                    "content": entry["content"],
                    "single_word": entry.get("single_word", False),
                    "lstrip": entry.get("lstrip", False),
                    "rstrip": entry.get("rstrip", False),
                    "normalized": entry.get("normalized", not entry.get("special", False)),
                    "special": entry.get("special", False),
                }
                for token_id, entry in sorted(added_tokens.items(), key=lambda kv: int(kv[0]))
            ]
            backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as e:
        raise CheckpointError(f"cannot load {file}: {e}") from None
    known = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in dict.fromkeys(special) if t not in known]
    if missing:
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
    return backend


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the settings HF keeps in tokenizer_config.json."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        padding_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        tokens = dict(_DEFAULT_SPECIAL_TOKENS)
        tokens.update(special_tokens or {})
        self.special_tokens = {k: v for k, v in tokens.items() if v is not None}
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Load a folder's tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"no tokenizer.json in {path}")
        config = read_json(path / "tokenizer_config.json") or {}
        legacy = read_json(path / "special_tokens_map.json") or {}
        special = {}
        for key in _SPECIAL_TOKEN_KEYS:
            if key in config:
                special[key] = _token_content(config[key])
            elif key in legacy:
                special[key] = _token_content(legacy[key])
        extra = config.get("additional_special_tokens") or legacy.get("additional_special_tokens")
        special_strings = [v for v in special.values() if v is not None]
        special_strings += [_token_content(t) for t in extra or []]
        backend = _load_backend(file, config.get("added_tokens_decoder"), special_strings)
        return cls(
            backend,
            special_tokens=special,
            padding_side=config.get("padding_side", "right"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=config.get("model_max_length"),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (None when unknown)."""
        return self.backend.token_to_id(token)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (special-token strings in the text become their ids)."""
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts, unpadded."""
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids `int[T]` (list, numpy or jax array)."""
        ids = np.asarray(token_ids).reshape(-1).tolist()
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def batch_decode(
        self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """Texts of a batch of id sequences `int[B, T]`."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]
