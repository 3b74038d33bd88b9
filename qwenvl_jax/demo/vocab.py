"""A small byte-level BPE vocabulary for the demo model, in the `qwen.tiktoken` format.

The real vocabulary has 151,643 ranks; a model that tiny would spend nearly all its compute on the
embedding and the output layer. The demo trains its own merges on its own texts (with Qwen's split
pattern), writes them as `qwen.tiktoken` into the model folder, and the Qwen-VL processor then
places the special tokens right after the ranks, as the original tokenizer does.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

import regex

from qwenvl_jax.processing.qwen_vl_v1 import PAT_STR


def train_vocab(texts: list[str], max_size: int) -> dict[bytes, int]:
    """Byte-level BPE: the 256 bytes (rank = byte value), then the most frequent adjacent pair of
    the split pieces merged, again and again, until max_size ranks or no pair is left."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(p.encode() for t in texts for p in regex.findall(PAT_STR, t))
    parts = {w: [w[i : i + 1] for i in range(len(w))] for w in words}
    while len(ranks) < max_size:
        pairs: Counter = Counter()
        for w, n in words.items():
            p = parts[w]
            for a, b in zip(p, p[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w in words:
            p, out, i = parts[w], [], 0
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            parts[w] = out
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n")
