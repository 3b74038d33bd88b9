"""Patch-count and prompt-length buckets: at most 12.5% of padding above the minimum, whole 2 x 2
merge blocks for the patches, and one bucket for nearby sizes (one compiled program)."""

from qwenvl_jax.inference.generate import length_bucket
from qwenvl_jax.models.vision_inputs import bucket


def test_buckets_pad_less_than_an_eighth():
    for n in range(1, 70_000):
        b = bucket(n)
        assert b >= n and b % 4 == 0
        assert b == 64 if n <= 64 else (b - n) / n < 0.125, n
    assert [bucket(n) for n in (64, 65, 72, 73, 128, 129, 768, 769, 1025)] == [
        64, 72, 72, 80, 128, 144, 768, 832, 1152
    ]  # fmt: skip
    assert bucket(768) == 768  # a 24 x 32 patch picture is not padded to 1024


def test_length_buckets():
    assert length_bucket(10) == 64 and length_bucket(3, minimum=32) == 32
    assert length_bucket(600) == 640 and length_bucket(1030) == 1152 and length_bucket(4100) == 4608
    # few programs: 8 sizes per power of two
    assert len({length_bucket(n) for n in range(1025, 2049)}) == 8
