"""A small byte-level BPE vocabulary for the demo model, in the `qwen.tiktoken` format.

The real vocabulary has 151,643 ranks; a model that tiny would spend nearly all its compute on the
embedding and the output layer. The demo trains its own merges on its own texts with the
`tokenizers` library's `BpeTrainer`, pre-tokenized as Qwen2's tokenizer.json does (Qwen's split
pattern, then byte-level without its own regex; all 256 bytes as the initial alphabet). The
result is written as `qwen.tiktoken` into the model folder: the 256 bytes (rank = byte value),
then the merged tokens in the order the trainer made them. The Qwen-VL processor then places the
special tokens right after the ranks, as the original tokenizer does.
"""

from __future__ import annotations

import base64
from pathlib import Path

from qwenvl_jax.processing.qwen_vl_v1 import PAT_STR


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table of byte-level BPE vocabularies."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenizer(pattern: str = PAT_STR):
    """Split on `pattern` (each match a piece of its own), then bytes -> ByteLevel characters."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_vocab(texts: list[str], max_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes (rank = byte value), then the trainer's tokens in the
    order it merged them, until max_size ranks or no pair is left. The same texts give the same
    ranks (the trainer breaks ties between equally frequent pairs by their token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=max_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    # The trainer gives the 256 alphabet characters ids 0..255 in character order and each new
    # token the next id; a merge that remakes an existing token adds none.
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    merged = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= 256)
    ranks = {bytes([b]): b for b in range(256)}
    for rank, (_, token) in enumerate(merged, start=256):
        ranks[bytes(to_byte[c] for c in token)] = rank
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n")
