"""Packing for Qwen3-VL (DeepStack features scattered into the packed row, interleaved M-RoPE,
per-frame video timestamps): each packed sample gets the logits it gets alone. See
`tests.data_helpers.check_packed_parity`.
"""

from __future__ import annotations

from tests.data_helpers import check_packed_parity


def test_packed_row_gives_each_sample_its_own_logits_qwen3_vl(tmp_path):
    check_packed_parity("qwen3_vl", tmp_path)
