"""Dequantise the block-wise FP8 weights of the `*-FP8` checkpoints (Qwen3-VL, Qwen3-VL-MoE).

config.json's `quantization_config` is `{"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128], ...}`. A quantised weight `W`
(float8_e4m3fn `[..., out, in]`) is stored next to `W_scale_inv` (`X.weight` next to
`X.weight_scale_inv`, a fused expert tensor `X.gate_up_proj` next to `X.gate_up_proj_scale_inv`),
float32 or bfloat16 `[..., ceil(out/128), ceil(in/128)]`, one scale per 128x128 block, the blocks
on the right and bottom edges partial. The real weight is `float32(W) * scale_inv` with the scale
of each element's block, computed in float32 and then cast, as transformers'
`integrations/finegrained_fp8.py` does. Leading dimensions (experts) carry their own scales.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading.reader import MissingTensorError, TensorInfo, TensorReader

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
# Static activation scales sit next to a quantised weight's module; they mean nothing once the
# weight is dequantised.
_ACTIVATION_SCALES = ("activation_scale", "input_scale")
_FLOAT8 = {
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
    np.dtype(ml_dtypes.float8_e4m3fnuz),
    np.dtype(ml_dtypes.float8_e5m2fnuz),
}


def as_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """np.dtype of a name or type, "bfloat16" and the float8 names included."""
    if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


def _scale_to_f32(scale: np.ndarray) -> np.ndarray:
    if scale.dtype == np.uint8:  # MXFP8 stores the E8M0 exponent byte: 2 ** (byte - 127)
        return np.exp2(scale.astype(np.float32) - 127.0)
    return scale.astype(np.float32)


def block_shape(
    weight_shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    block_size: tuple[int, int] | None,
) -> tuple[int, int] | None:
    """The (rows, cols) block each scale covers, or None for one scale for the whole tensor.

    With the config's block size, the scale grid must be `ceil(out/b0) x ceil(in/b1)`; without
    one, the block is derived from a grid that divides the weight exactly, as transformers does.
    Raises ValueError when the grid does not fit.
    """
    if math.prod(scale_shape) == 1:
        return None
    if len(weight_shape) < 2 or len(scale_shape) != len(weight_shape):
        raise ValueError(f"scale shape {list(scale_shape)} does not fit {list(weight_shape)}")
    if scale_shape[:-2] != weight_shape[:-2]:
        raise ValueError(f"scale shape {list(scale_shape)} does not fit {list(weight_shape)}")
    rows, cols = weight_shape[-2:]
    srows, scols = scale_shape[-2:]
    if block_size is not None:
        b0, b1 = block_size
        if (-(-rows // b0), -(-cols // b1)) == (srows, scols):
            return b0, b1
    elif srows and scols and rows % srows == 0 and cols % scols == 0:
        return rows // srows, cols // scols
    raise ValueError(
        f"scale grid {list(scale_shape)} does not fit weight {list(weight_shape)} with block "
        f"size {list(block_size) if block_size else None}"
    )


def dequantize_fp8(
    weight: np.ndarray,
    scale_inv: np.ndarray,
    block_size: tuple[int, int] | None = (128, 128),
    dtype: str | np.dtype = "bfloat16",
) -> np.ndarray:
    """float8[..., R, C] weight and float[..., ceil(R/b0), ceil(C/b1)] scales -> dtype[..., R, C].

    Computed in float32, then cast to `dtype`, one block-row at a time: neither a full-size
    float32 copy of the weight nor a full-size grid of scales is ever built.
    """
    out = np.empty(weight.shape, as_dtype(dtype))
    block = block_shape(weight.shape, scale_inv.shape, block_size)
    s = _scale_to_f32(scale_inv)
    if block is None:
        out[...] = weight.astype(np.float32) * s.reshape(())
        return out
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    for i in range(s.shape[-2]):
        # float[..., C]: this block-row's scales, each repeated over its b1 columns.
        row_scale = np.repeat(s[..., i, :], b1, axis=-1)[..., :cols]
        r = slice(i * b0, min((i + 1) * b0, rows))
        out[..., r, :] = weight[..., r, :].astype(np.float32) * row_scale[..., None, :]
    return out


def _block_size_from_config(config: Mapping[str, Any]) -> tuple[int, int] | None:
    block = config.get("weight_block_size")
    if block is None:
        return None
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise CheckpointError(f"quantization_config: bad weight_block_size {block!r}")
    return int(block[0]), int(block[1])


class Fp8DequantReader(TensorReader):
    """A view of a reader of an FP8 checkpoint with every quantised weight dequantised.

    `keys()` hides the `*_scale_inv` tensors (and static activation scales); `get(key)` of a
    quantised weight returns it dequantised in `dtype`, and `dtype(key)` says so. Other tensors
    (the modules left unquantised, norms, biases) come back unchanged. Every weight/scale pair is
    checked when the reader is made, so a mismatched checkpoint fails before any work is done.
    """

    def __init__(
        self,
        reader: TensorReader,
        quantization_config: Mapping[str, Any],
        dtype: str | np.dtype = "bfloat16",
    ) -> None:
        self.reader = reader
        self._name = str(getattr(reader, "path", "checkpoint"))
        config = dict(quantization_config)
        if config.get("quant_method") != "fp8":
            raise CheckpointError(
                f"{self._name}: quant_method {config.get('quant_method')!r} is not supported "
                "(only 'fp8' block quantisation is dequantised)"
            )
        if config.get("fmt", "e4m3") not in ("e4m3", "e5m2"):
            raise CheckpointError(f"{self._name}: unsupported fp8 fmt {config.get('fmt')!r}")
        self.block_size = _block_size_from_config(config)
        self.out_dtype = as_dtype(dtype)

        keys = reader.keys()
        present = set(keys)
        hidden: set[str] = set()
        self._scale_key: dict[str, str] = {}
        self._block: dict[str, tuple[int, int] | None] = {}
        for key in keys:
            if not key.endswith(SCALE_SUFFIX):
                continue
            weight_key = key[: -len(SCALE_SUFFIX)]
            if weight_key not in present:
                raise CheckpointError(f"{self._name}: scale {key!r} has no weight {weight_key!r}")
            hidden.add(key)
            self._scale_key[weight_key] = key
            try:
                self._block[weight_key] = block_shape(
                    reader.shape(weight_key), reader.shape(key), self.block_size
                )
            except ValueError as e:
                raise CheckpointError(f"{self._name}: {weight_key!r}: {e}") from None
            module = weight_key.rsplit(".", 1)[0]
            hidden.update(f"{module}.{n}" for n in _ACTIVATION_SCALES if f"{module}.{n}" in present)
        for key in keys:
            unscaled = key not in hidden and key not in self._scale_key
            if unscaled and np.dtype(reader.dtype(key)) in _FLOAT8:
                raise CheckpointError(
                    f"{self._name}: float8 tensor {key!r} has no {key + SCALE_SUFFIX!r}"
                )
        self._keys = [k for k in keys if k not in hidden]
        self._visible = set(self._keys)
        logger.info(
            "%s: %d FP8 weights dequantised to %s on read",
            self._name,
            len(self._scale_key),
            self.out_dtype.name,
        )

    @property
    def quantized_keys(self) -> list[str]:
        """The weights that are stored in FP8 and dequantised by `get`."""
        return sorted(self._scale_key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        if key not in self._visible:
            if key in self.reader:
                raise MissingTensorError(f"{self._name}: {key!r} is a hidden dequantisation scale")
            raise MissingTensorError(f"{self._name}: no tensor named {key!r}")
        info = self.reader.info(key)
        if key in self._scale_key:
            return TensorInfo(info.shape, self.out_dtype, info.file)
        return info

    def get(self, key: str) -> np.ndarray:
        self.info(key)
        scale_key = self._scale_key.get(key)
        if scale_key is None:
            return self.reader.get(key)
        return dequantize_fp8(
            self.reader.get(key), self.reader.get(scale_key), self._block[key], self.out_dtype
        )

    def close(self) -> None:
        self.reader.close()
