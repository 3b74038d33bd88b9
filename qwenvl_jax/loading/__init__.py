"""Checkpoint I/O: read safetensors / torch `.bin` checkpoints tensor by tensor, dequantise FP8,
write sharded safetensors. numpy only (no torch, no jax)."""

from qwenvl_jax.loading.fp8 import Fp8DequantReader, dequantize_fp8
from qwenvl_jax.loading.reader import CheckpointReader, TensorInfo, TensorReader, open_checkpoint
from qwenvl_jax.loading.torch_bin import TorchBinFile
from qwenvl_jax.loading.writer import WriteResult, atomic_dir, write_safetensors

__all__ = [
    "CheckpointReader",
    "Fp8DequantReader",
    "TensorInfo",
    "TensorReader",
    "TorchBinFile",
    "WriteResult",
    "atomic_dir",
    "dequantize_fp8",
    "open_checkpoint",
    "write_safetensors",
]
