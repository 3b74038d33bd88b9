"""The one loader of Hugging Face checkpoints: `from_pretrained` fills a model with it and
`convert` writes Orbax groups with it.

Plan, then place: every checkpoint key is first mapped through the family's table on zero-byte
stand-ins and checked against the model's abstract parameters (`plan_import`), so a missing,
unexpected, mis-shaped or doubly-mapped tensor fails at once, naming the tensor, before any data
is read. Then each tensor is read once, mapped and placed straight into its parameter's shards
(`import_tensor`), so no more than one host tensor is alive at a time. Parameters are addressed
by checkpoint path, one per decoder layer and ViT block (`stacking.checkpoint_view`);
`fill_model` writes the layers into their stacked arrays in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.errors import CheckpointError, ConfigError, InputError
from qwenvl_jax.loading.experts import fuse_experts
from qwenvl_jax.loading.fp8 import Fp8DequantReader, as_dtype
from qwenvl_jax.loading.mapping import Mapping as WeightMapping
from qwenvl_jax.loading.reader import TensorReader, open_checkpoint
from qwenvl_jax.loading.stacking import Stacker, checkpoint_view

# ----------------------------------------------------------------------------- folders


def read_hf_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict (ConfigError when missing or broken)."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no config.json (not a checkpoint folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def fp8_quantization(hf_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The FP8 `quantization_config` of a config, None when unquantised; other schemes raise."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "fp8":
        raise CheckpointError(
            f"quantization {method!r} is not supported (only block-wise 'fp8' is dequantised)"
        )
    return dict(quant)


def open_weights(
    src: str | os.PathLike[str], hf_config: Mapping[str, Any], dtype: str
) -> TensorReader:
    """A tensor reader over a checkpoint folder; FP8 weights come back dequantised in `dtype`,
    per-expert MoE tensors fused."""
    reader: TensorReader = open_checkpoint(src)
    quant = fp8_quantization(hf_config)
    if quant is not None:
        try:
            reader = Fp8DequantReader(reader, quant, dtype)
        except BaseException:
            reader.close()
            raise
    try:
        return fuse_experts(reader)
    except BaseException:
        reader.close()
        raise


# ----------------------------------------------------------------------------- plan


def ghost(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A read-only array of `shape` that takes no memory: stands in for a tensor when only the
    mapping's names and shapes are wanted."""
    return np.broadcast_to(np.zeros((), as_dtype(dtype)), tuple(shape))


def _hub_names(mapping: WeightMapping, abstract: Mapping[str, Any]) -> dict[str, str]:
    """param path -> the checkpoint key it is stored under (to name missing tensors)."""
    names = {}
    for path, sds in abstract.items():
        try:
            for key, _ in mapping.export_tensors({path: ghost(sds.shape, sds.dtype)}):
                names[path] = key
        except Exception:  # a parameter that is exported only together with others
            continue
    return names


def plan_import(
    reader: TensorReader,
    mapping: WeightMapping,
    abstract: Mapping[str, Any],
    *,
    tied: bool = False,
) -> list[tuple[str, list[str]]]:
    """Map every checkpoint key on stand-ins: [(key, [param paths])], in reading order.

    Raises CheckpointError naming the first key that maps nowhere or to the wrong shape, a
    parameter written twice, or a parameter no key fills (with the key it is stored under).
    """
    plan: list[tuple[str, list[str]]] = []
    filled: dict[str, str] = {}
    for key in reader:
        if mapping.is_ignored(key) or (tied and key == "lm_head.weight"):
            continue
        info = reader.info(key)

        def target_shape(path: str, key: str = key) -> tuple[int, ...]:
            if path not in abstract:
                raise CheckpointError(f"checkpoint key {key!r} maps to unknown parameter {path}")
            return tuple(abstract[path].shape)

        paths = []
        for path, a in mapping.import_tensor(key, ghost(info.shape, info.dtype), target_shape):
            want = target_shape(path)
            if tuple(a.shape) != want:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} has shape {list(info.shape)}, parameter {path} "
                    f"expects {list(want)}"
                )
            if path in filled:
                raise CheckpointError(
                    f"parameter {path} is filled twice, by {filled[path]!r} and {key!r}"
                )
            filled[path] = key
            paths.append(path)
        plan.append((key, paths))
    missing = [p for p in abstract if p not in filled]
    if missing:
        names = _hub_names(mapping, {p: abstract[p] for p in missing[:1]})
        first = f"{names[missing[0]]!r} (parameter {missing[0]})" if names else missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint lacks tensor {first}{more}")
    return plan


# ----------------------------------------------------------------------------- place


def place(a: np.ndarray, target: Any) -> jax.Array:
    """One host tensor -> an array with the target's dtype, placed in the target's shards."""
    a = np.asarray(a)
    if a.dtype != target.dtype:
        a = a.astype(target.dtype)
    sharding = getattr(target, "sharding", None)
    if sharding is None or (
        isinstance(sharding, NamedSharding) and sharding.spec == PartitionSpec()
    ):
        return jax.device_put(a, sharding)
    # jax copies strided views (a transposed kernel) straight into the device buffer: no
    # contiguous host copy first.
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def import_tensor(
    key: str, array: np.ndarray, mapping: WeightMapping, abstract: Mapping[str, Any]
) -> dict[str, jax.Array]:
    """One checkpoint tensor -> its placed parameters (the host tensor dies on return)."""
    outs = mapping.import_tensor(key, array, lambda p: tuple(abstract[p].shape))
    return {path: place(a, abstract[path]) for path, a in outs}


def fill_model(
    abs_model: nnx.Module, reader: TensorReader, mapping: WeightMapping, *, progress: bool = False
) -> nnx.Module:
    """The abstract (sharded) `abs_model` filled from `reader`: planned, then one tensor at a
    time, each decoder layer written into its stacked array in place."""
    graphdef, abs_state = nnx.split(abs_model)
    flat = {".".join(map(str, p)): v.get_raw_value() for p, v in nnx.to_flat_state(abs_state)}
    text = abs_model.config.text
    abstract = checkpoint_view(flat, abs_model.config)
    plan = plan_import(reader, mapping, abstract, tied=getattr(text, "tie_word_embeddings", False))
    stacker = Stacker(flat, abs_model.config)
    keys = [key for key, _ in plan]
    if progress:
        from tqdm import tqdm

        keys = tqdm(keys, desc="loading", unit="tensor")
    for key in keys:
        for path, a in import_tensor(key, reader.get(key), mapping, abstract).items():
            stacker.put(path, a)
    placed = stacker.result()
    state = nnx.from_flat_state(
        [(p, v.replace(placed[".".join(map(str, p))])) for p, v in nnx.to_flat_state(abs_state)]
    )
    return nnx.merge(graphdef, state)
