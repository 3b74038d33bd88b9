"""The demo's vocabulary as a Qwen2/2.5/3-VL tokenizer: `tokenizer.json` (the `tokenizers`
library's byte-level BPE, with Qwen's split pattern), the special tokens of those checkpoints
right after the ranks, and a ChatML chat template that writes each image or video as
`<|vision_start|><|image_pad|><|vision_end|>` (the processor expands the pad per patch group).

The tiktoken ranks (demo/vocab.py) carry no merge list; `merges_of` recovers it the usual way: the
merge that made a token is the last step of BPE on its bytes using only lower ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenvl_jax.demo.vocab import bytes_to_unicode, pre_tokenizer

# In Qwen2-VL's order after its 151,643 ranks (<|endoftext|> = 151643 ... <|video_pad|> = 151656).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that reproduces tiktoken's BPE over `ranks`."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, where = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, where = r, i
            if where < 0:
                break
            parts[where : where + 2] = [parts[where] + parts[where + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer_files(ranks: dict[bytes, int], folder: str | Path, pattern: str) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.json for `ranks` (special tokens
    at ids len(ranks) + i in SPECIAL_TOKENS order); `pattern` is the pre-tokenizer regex."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    folder = Path(folder)
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_of(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizer(pattern)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n"
    )
