"""Checkpoint conversion, Hugging Face folder <-> our Orbax folder, one tensor at a time.

`hf_to_orbax` reads the checkpoint tensor by tensor (safetensors or torch `.bin`, single or
sharded; FP8 weights dequantised on read), maps each through the family's table
(`mapping_for(config)`), checks it against the model's abstract shapes, places it on the mesh and
hands bounded groups of parameters to `orbax_io.save_param_groups`. Every key is mapped and checked
on zero-byte stand-ins before any data is read, so a missing, unexpected or mis-shaped tensor
fails at once and names the tensor. `orbax_to_hf` restores bounded groups of parameters, maps
them back to the hub names and layouts and streams them into sharded safetensors. Peak memory is
about the largest tensor plus one group, whatever the model's size.

The tokenizer, processor, chat-template and generation-config files travel with the weights.
The Orbax marker records the source's tensor shapes, so an export writes each tensor in the
layout the source had (Qwen3-VL-MoE experts exist both ways round: (E, H, 2I) on the hub,
(E, 2I, H) from `save_pretrained` in transformers 5), and a round trip is bit-identical.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qwenvl_jax.config import ModelConfig, from_hf
from qwenvl_jax.errors import CheckpointError, ConfigError, InputError
from qwenvl_jax.loading import orbax_io
from qwenvl_jax.loading.experts import FusedExpertsReader, split_experts
from qwenvl_jax.loading.fp8 import as_dtype
from qwenvl_jax.loading.load import (
    fp8_quantization,
    ghost,
    import_tensor,
    open_weights,
    plan_import,
    read_hf_config,
)
from qwenvl_jax.loading.mapping import Mapping as WeightMapping
from qwenvl_jax.loading.mapping import mapping_for
from qwenvl_jax.loading.reader import TensorReader
from qwenvl_jax.loading.writer import write_safetensors
from qwenvl_jax.models.build import build_model
from qwenvl_jax.models.mtp import fit_mtp

logger = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers reads max_shard_size="5GB" as 10**9 units
# Files that are weights, indexes or written here; every other top-level file travels with DST
# (tokenizer.json, vocab.json, merges.txt, qwen.tiktoken, chat_template.json/.jinja,
# preprocessor_config.json, video_preprocessor_config.json, generation_config.json, remote code).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_NOT_COPIED = {"config.json", orbax_io.MARKER_NAME}


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote: the folder, family, dtype, number of tensors and their bytes."""

    dst: Path
    family: str
    dtype: str
    tensors: int
    nbytes: int


# ----------------------------------------------------------------------------- config.json


def checkpoint_dtype(hf_config: Mapping[str, Any]) -> str:
    """The dtype a checkpoint's weights are meant to be used in: "bfloat16" or "float32"."""
    if fp8_quantization(hf_config) is not None:
        return "bfloat16"
    text = hf_config.get("text_config") or {}
    for d in (hf_config, text):
        name = d.get("dtype") or d.get("torch_dtype")
        if isinstance(name, str):
            return "float32" if name == "float32" else "bfloat16"
    return "bfloat16"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported (use one of {', '.join(DTYPES)})")
    return dtype


def export_config(hf_config: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """config.json for weights now stored in `dtype`: the dtype fields updated, and a
    quantization_config dropped (the weights are no longer quantised)."""
    out = json.loads(json.dumps(hf_config))
    out.pop("quantization_config", None)
    for d in (out, *(out.get(k) for k in ("text_config", "vision_config"))):
        if not isinstance(d, dict):
            continue
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = dtype
    if "dtype" not in out and "torch_dtype" not in out:
        out["torch_dtype"] = dtype
    return out


def copy_side_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer, processor, chat-template, generation-config and other small files of
    `src` (every top-level file that is not weights, an index or config.json) into `dst`."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in _NOT_COPIED:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copyfile(path, Path(dst) / name)
        copied.append(name)
    logger.info("copied %s", ", ".join(copied) or "no side files")
    return copied


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- helpers


def _abstract_params(config: ModelConfig, dtype: str, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
    model = build_model(config, dtype=dtype, mesh=mesh, abstract=True)
    return orbax_io.flat_params(model)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
    )


# ----------------------------------------------------------------------------- HF -> Orbax


def _import_groups(
    reader: TensorReader,
    mapping: WeightMapping,
    plan: list[tuple[str, list[str]]],
    abstract: Mapping[str, Any],
    chunk_bytes: int,
    progress: Callable[[int], Any],
) -> Iterator[dict[str, jax.Array]]:
    """Groups of placed parameters (at most `orbax_io.chunk_size` bytes), each made only once
    the previous one has been saved and dropped; one host tensor is alive at a time."""

    def nbytes(path: str) -> int:
        return int(np.prod(abstract[path].shape)) * np.dtype(abstract[path].dtype).itemsize

    sizes = [(key, sum(nbytes(p) for p in paths)) for key, paths in plan]
    limit = orbax_io.chunk_size(sum(n for _, n in sizes), chunk_bytes)
    for keys in orbax_io.group_by_size(sizes, limit):
        group = {}
        for key in keys:
            group.update(import_tensor(key, reader.get(key), mapping, abstract))
            progress(reader.info(key).nbytes)
        yield group
        del group


def hf_to_orbax(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str | None = None,
    *,
    mesh: Any = None,
    progress: bool = True,
    chunk_bytes: int = orbax_io.DEFAULT_CHUNK_BYTES,
) -> ConversionResult:
    """Convert a Hugging Face checkpoint folder into an Orbax folder at `dst` (empty or new).

    `dtype` ("bfloat16", "float32"; default: the checkpoint's own) is the stored dtype. With a
    `mesh`, parameters are placed in their shards and every process writes the shards it holds
    (call on every process). Write into a temporary folder and rename it (the `convert`
    command does, through `loading.writer.atomic_dir`) to leave nothing half-written behind.
    """
    src, dst = Path(src), Path(dst)
    if orbax_io.is_orbax_folder(src):
        raise InputError(f"{src}: is already an Orbax folder (convert it with --to hf)")
    hf_config = read_hf_config(src)
    config = from_hf(hf_config)
    dtype = check_dtype(dtype or checkpoint_dtype(hf_config))
    with open_weights(src, hf_config, dtype) as reader:
        config = fit_mtp(config, reader.keys())
        abstract = _abstract_params(config, dtype, mesh)
        mapping = mapping_for(config)
        plan = plan_import(
            reader, mapping, abstract, tied=getattr(config.text, "tie_word_embeddings", False)
        )
        total = sum(reader.info(k).nbytes for k, _ in plan)
        source_shapes = {k: list(reader.info(k).shape) for k, _ in plan}
        logger.info("%s: %d tensors, %.2f GB -> %s (%s)", src, len(plan), total / 1e9, dst, dtype)
        dst.mkdir(parents=True, exist_ok=True)
        with _progress(total, f"{src.name} -> orbax", progress) as bar:
            groups = _import_groups(reader, mapping, plan, abstract, chunk_bytes, bar.update)
            written = orbax_io.save_param_groups(groups, dst / orbax_io.PARAMS_DIR)
        layout = getattr(reader, "layout", None) or getattr(
            getattr(reader, "reader", None), "layout", None
        )
        split = isinstance(reader, FusedExpertsReader)  # experts stored one by one
    if jax.process_index() == 0:
        copy_side_files(src, dst)
    _write_json(dst / "config.json", export_config(hf_config, dtype))
    orbax_io.write_marker(
        dst,
        family=config.family,
        dtype=dtype,
        source={
            "layout": layout,
            "fp8": fp8_quantization(hf_config) is not None,
            "shapes": source_shapes,
            "experts_per_expert": split,
        },
    )
    nbytes = sum(int(np.prod(s)) * np.dtype(as_dtype(d)).itemsize for s, d in written.values())
    return ConversionResult(dst, config.family, dtype, len(written), nbytes)


# ----------------------------------------------------------------------------- Orbax -> HF


class _Recorder(Mapping):
    """Stand-ins for every parameter that note the order the mapping's export reads them in."""

    def __init__(self, abstract: Mapping[str, Any], dtype: str) -> None:
        self.abstract, self.dtype, self.order = abstract, dtype, []

    def __getitem__(self, path: str) -> np.ndarray:
        sds = self.abstract[path]
        self.order.append(path)
        return ghost(sds.shape, self.dtype)

    def __contains__(self, path: object) -> bool:
        return path in self.abstract

    def __iter__(self) -> Iterator[str]:
        return iter(self.abstract)

    def __len__(self) -> int:
        return len(self.abstract)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        return ((path, self[path]) for path in self.abstract)


class _LazyParams(Mapping):
    """The parameters of an Orbax folder as a read-on-demand mapping {path: host array}.

    Parameters are read ahead in groups of at most `group_bytes`, following `order` (the order
    the export read the stand-ins in); each is handed out once and then forgotten.
    """

    def __init__(
        self, folder: Path, order: list[str], dtype: str, stored: Mapping, group_bytes: int
    ) -> None:
        self.folder, self.dtype, self.stored = folder, as_dtype(dtype), stored
        self.order = list(dict.fromkeys(order))
        sizes = ((p, orbax_io.param_bytes(stored, p, self.dtype)) for p in self.order)
        self._groups = orbax_io.group_by_size(sizes, group_bytes)
        self._ahead: dict[str, np.ndarray] = {}

    def __getitem__(self, path: str) -> np.ndarray:
        if path not in self.stored:
            raise KeyError(path)
        if path not in self._ahead:
            group = next(self._groups, [])
            if path not in group:  # read out of the recorded order: alone
                group = [path]
            self._ahead.update(
                orbax_io.read_params(self.folder, group, self.dtype, stored=self.stored)
            )
        return self._ahead.pop(path)

    def __contains__(self, path: object) -> bool:
        return path in self.stored

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:  # type: ignore[override]
        return ((path, self[path]) for path in self.order)


def _source_layout(key: str, a: np.ndarray, source_shapes: Mapping[str, list[int]]) -> np.ndarray:
    """`a` in the layout the source checkpoint stored `key` in, when that was the other way
    round in its last two dimensions (fused experts); else `a` as the mapping gives it."""
    want = source_shapes.get(key)
    if want is None or a.ndim < 3 or list(a.shape) == list(want):
        return a
    if list(np.swapaxes(a, -1, -2).shape) == list(want):
        return np.swapaxes(a, -1, -2)
    return a


def orbax_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    progress: bool = True,
    group_bytes: int = orbax_io.DEFAULT_CHUNK_BYTES,
) -> ConversionResult:
    """Export an Orbax folder to Hugging Face safetensors at `dst` (empty or new): the hub key
    names and layouts of the family (or those of the checkpoint it was converted from), sharded
    with an index past `max_shard_bytes`, with config.json and the side files. Runs on one
    process (the parameters are read to host memory a group at a time)."""
    src, dst = Path(src), Path(dst)
    if not orbax_io.is_orbax_folder(src):
        raise InputError(
            f"{src}: not an Orbax folder written by qwenvl-jax (no "
            f"{orbax_io.MARKER_NAME} with {orbax_io.PARAMS_DIR}/)"
        )
    marker = orbax_io.read_marker(src)
    hf_config = read_hf_config(src)
    if "family" in hf_config and "text" in hf_config:
        raise ConfigError(
            f"{src}/config.json is qwenvl_jax's own format; exporting needs the "
            "Hugging Face config.json of the model"
        )
    config = from_hf(hf_config)
    dtype = check_dtype(dtype or marker.get("dtype") or "bfloat16")
    stored = orbax_io.stored_params(src)
    config = fit_mtp(config, stored)
    abstract = _abstract_params(config, dtype, None)
    orbax_io.check_stored(src, abstract, stored, expected_by=config.family)
    extra = sorted(set(stored) - set(abstract))
    if extra:
        raise CheckpointError(f"{src}: stored parameter {extra[0]} is not part of {config.family}")
    mapping = mapping_for(config)
    source = marker.get("source") or {}
    source_shapes = source.get("shapes") or {}
    # a source that stored experts one by one gets them back that way
    per_expert = split_experts if source.get("experts_per_expert") else lambda k, a: [(k, a)]
    # Run the export on stand-ins first: the plan of names and shapes (safetensors headers go
    # first), and the order it reads parameters in, to read them ahead in that order.
    recorder = _Recorder(abstract, dtype)
    plan = [
        (name, part.shape, dtype)
        for key, a in mapping.export_tensors(recorder)
        for name, part in per_expert(key, _source_layout(key, a, source_shapes))
    ]
    order = list(dict.fromkeys([*recorder.order, *abstract]))
    total = sum(int(np.prod(s)) * as_dtype(dtype).itemsize for _, s, _ in plan)
    logger.info("%s: %d tensors, %.2f GB -> %s (%s)", src, len(plan), total / 1e9, dst, dtype)
    lazy = _LazyParams(src, order, dtype, stored, group_bytes)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        with _progress(total, f"{src.name} -> hf", progress) as bar:
            for key, a in mapping.export_tensors(lazy):
                a = np.asarray(_source_layout(key, a, source_shapes)).astype(
                    as_dtype(dtype), copy=False
                )
                for name, part in per_expert(key, a):
                    yield name, np.ascontiguousarray(part)
                bar.update(a.nbytes)

    dst.mkdir(parents=True, exist_ok=True)
    result = write_safetensors(dst, tensors(), max_shard_bytes, plan=plan)
    logger.info("%s: %s", dst, ", ".join(result.files))
    copy_side_files(src, dst)
    _write_json(dst / "config.json", export_config(hf_config, dtype))
    return ConversionResult(dst, config.family, dtype, len(plan), total)
