"""Bad-sample accounting: the error a bad sample raises, the counters the pipeline keeps, and the
rate-limited warning that says what was skipped.

By default a bad sample (malformed record, missing or corrupt media, longer than the sequence)
is counted and skipped with a warning, so that a long run never dies of one; with `strict=True`
it is an error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from qwenvl_jax.errors import InputError

logger = logging.getLogger(__name__)

# Why a sample was skipped.
MALFORMED = "malformed"  # not JSON, no conversation, wrong structure, a bad box
MISSING_MEDIA = "missing_media"  # a media file that does not exist
CORRUPT_MEDIA = "corrupt_media"  # a media file that cannot be decoded
TOO_LONG = "too_long"  # more tokens than seq_len, or more patches / images than the budget
NO_TARGET = "no_target"  # nothing to learn: no assistant turn with loss on assistant tokens
MEDIA_OUTSIDE_ROOT = "media_outside_root"  # `qwenvl-jax data`: a media file outside the media roots
REASONS = (MALFORMED, MISSING_MEDIA, CORRUPT_MEDIA, TOO_LONG, NO_TARGET, MEDIA_OUTSIDE_ROOT)

_WARN_FIRST = 20  # warn for each of the first skips, then every _WARN_EVERY-th
_WARN_EVERY = 1000


class SampleError(InputError):
    """One sample that cannot be used. `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def classify(error: Exception) -> str:
    """The skip reason of an exception raised while reading or processing a sample."""
    if isinstance(error, SampleError):
        return error.reason
    if isinstance(error, FileNotFoundError):
        return MISSING_MEDIA
    text = str(error)
    if text.startswith(("cannot read", "cannot decode", "cannot fetch")):
        return CORRUPT_MEDIA
    return MALFORMED


@dataclasses.dataclass
class DataStats:
    """Counters of a pipeline: `samples` packed into batches, `skipped` by reason, token slots
    filled (`tokens`) out of all slots (`slots`), and `batches`."""

    samples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    slots: int = 0
    batches: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def padding_share(self) -> float:
        """1 - filled slots / all slots, over every batch so far (0 before the first)."""
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add(self, other: DataStats) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.slots += other.slots
        self.batches += other.batches
        for reason, n in other.skipped.items():
            self.skip(reason, n)

    def summary(self) -> str:
        """`samples N, skipped M`, the line the CLI prints last."""
        return f"samples {self.samples}, skipped {self.num_skipped}"

    def describe(self) -> str:
        """The summary with the reasons for skips and the padding share, for logs."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (
            f"{self.summary()}{f' ({reasons})' if reasons else ''}, {self.batches} batches, "
            f"padding share {self.padding_share:.1%}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataStats:
        return cls(
            samples=int(d["samples"]),
            skipped={k: int(v) for k, v in d["skipped"].items()},
            tokens=int(d["tokens"]),
            slots=int(d["slots"]),
            batches=int(d["batches"]),
        )


class SkipPolicy:
    """Decides what happens to a bad sample: raise (strict) or count and warn (rate-limited)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._seen = 0

    def handle(self, error: Exception, where: str) -> str:
        """Raise `error` as a SampleError when strict; else log it and return its reason."""
        reason = classify(error)
        if self.strict:
            if isinstance(error, SampleError):
                raise error
            raise SampleError(reason, f"{where}: {error}") from error
        self._seen += 1
        if self._seen <= _WARN_FIRST or self._seen % _WARN_EVERY == 0:
            last = self._seen == _WARN_FIRST
            more = f" (from now on every {_WARN_EVERY}th skip is logged)" if last else ""
            logger.warning("skipped %s (%s): %s%s", where, reason, error, more)
        return reason
