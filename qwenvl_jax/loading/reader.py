"""Read Hugging Face checkpoint folders one tensor at a time, without torch.

`open_checkpoint(path)` finds the layout (`model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, sharded `.bin` with
`pytorch_model.bin.index.json`) and returns a `CheckpointReader`. Every shard's header is checked
when the checkpoint is opened, so a truncated file, an index naming a missing shard or a key its
shard lacks fails before any work is done, with a `CheckpointError` of one line that names the
file. A tensor is then read with positioned reads into a buffer of its own size: reading one never
maps or loads a whole shard, so peak memory is the largest tensor, not the largest shard.

The safetensors format is parsed here (8-byte little-endian header length, a JSON header, raw
little-endian data) so that bfloat16 and the float8 types come back as `ml_dtypes` arrays.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import ml_dtypes
import numpy as np

from qwenvl_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

# safetensors dtype codes and the numpy dtypes they are read as.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# A safetensors header larger than this is treated as corrupt (the Rust library uses 100 MB).
_MAX_HEADER_BYTES = 100 * 2**20


class MissingTensorError(CheckpointError, KeyError):
    """A tensor name the checkpoint does not hold (a `KeyError` too, for mapping-style callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is and what it looks like, known without reading its data."""

    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_R = TypeVar("_R", bound="TensorReader")


class TensorReader(abc.ABC):
    """The read-only, one-tensor-at-a-time interface every reader here implements."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """The tensor names, sorted."""

    @abc.abstractmethod
    def info(self, key: str) -> TensorInfo:
        """Shape, dtype and file of `key` (raises `MissingTensorError` when absent)."""

    @abc.abstractmethod
    def get(self, key: str) -> np.ndarray:
        """Read one tensor: a fresh, writable, C-contiguous, native-order array."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release open files; `get` fails afterwards."""

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> str:
        """numpy dtype name, e.g. "float32", "bfloat16", "float8_e4m3fn"."""
        return self.info(key).dtype.name

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' sizes in bytes (what an index's `total_size` holds)."""
        return sum(self.info(k).nbytes for k in self.keys())

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) in sorted key order, one tensor in memory at a time."""
        for key in self.keys():
            yield key, self.get(key)

    def __contains__(self, key: object) -> bool:
        try:
            self.info(key)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_exact(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    """Fill the uint8 array `buf` from byte `offset` of the open file `fd` (thread-safe)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(view) - done, offset + done)
            view[done : done + len(chunk)] = chunk
            n = len(chunk)
        if n == 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


class SafetensorsFile(TensorReader):
    """One `.safetensors` file. The header is parsed and checked against the file size at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self._infos, self._offsets, self.metadata = self._parse_header()
        except BaseException:
            self.close()
            raise
        self._keys = sorted(self._infos)

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, int], dict[str, str]]:
        assert self._fd is not None
        path, size = self.path, _file_size(self._fd)
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length {n} runs past the end of the {size}-byte file "
                "(truncated, or not a safetensors file)"
            )
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__)")
        data_start, data_size = 8 + n, size - 8 - n
        infos: dict[str, TensorInfo] = {}
        offsets: dict[str, int] = {}
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except KeyError as e:
                raise CheckpointError(
                    f"{path}: tensor {key!r}: unsupported dtype or missing field {e}"
                ) from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r}: malformed header entry") from None
            info = TensorInfo(shape, dtype, path)
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != info.nbytes:
                raise CheckpointError(
                    f"{path}: tensor {key!r}: offsets [{begin}, {end}] do not fit shape "
                    f"{list(shape)} of {dtype.name}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path}: tensor {key!r} ends at byte {data_start + end}, past the end of "
                    f"the {size}-byte file (truncated?)"
                )
            infos[key] = info
            offsets[key] = data_start + begin
        return infos, offsets, {str(k): str(v) for k, v in metadata.items()}

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {key!r}") from None

    def get(self, key: str) -> np.ndarray:
        info = self.info(key)
        if self._fd is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        buf = np.empty(info.nbytes, np.uint8)
        read_exact(self._fd, buf, self._offsets[key], self.path)
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_file(path: Path) -> TensorReader:
    """A reader for one weight file, chosen by its suffix."""
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    # Imported here: torch_bin builds on the base classes of this module.
    from qwenvl_jax.loading.torch_bin import TorchBinFile

    return TorchBinFile(path)


class CheckpointReader(TensorReader):
    """All tensors of a checkpoint (one file or shards), each read on demand from its shard.

    Attributes: `path` (what was opened), `layout` ("safetensors", "safetensors-sharded",
    "torch", "torch-sharded"), `files` (the weight files), `metadata` (the safetensors
    `__metadata__` of a single file, or the index's "metadata").
    """

    def __init__(
        self,
        path: Path,
        layout: str,
        files: Mapping[Path, TensorReader],
        key_to_file: Mapping[str, Path],
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        self.path = path
        self.layout = layout
        self._files = dict(files)
        self._key_to_file = dict(key_to_file)
        self._keys = sorted(self._key_to_file)
        self.metadata = dict(metadata or {})

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def keys(self) -> list[str]:
        return list(self._keys)

    def file_of(self, key: str) -> Path:
        """The weight file that holds `key` (to group reads by shard)."""
        return self.info(key).file

    def info(self, key: str) -> TensorInfo:
        try:
            file = self._key_to_file[key]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {key!r}") from None
        return self._files[file].info(key)

    def get(self, key: str) -> np.ndarray:
        try:
            file = self._key_to_file[key]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {key!r}") from None
        return self._files[file].get(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.path)!r}, layout={self.layout!r}, "
            f"tensors={len(self._keys)}, files={len(self._files)})"
        )


def _read_index(index_path: Path) -> tuple[dict[str, str], dict[str, object]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: corrupt index JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: no valid 'weight_map' (tensor name -> shard file)")
    for shard in set(weight_map.values()):
        p = Path(shard)
        if p.is_absolute() or ".." in p.parts:
            raise CheckpointError(f"{index_path}: shard name {shard!r} leaves the folder")
    metadata = index.get("metadata") or {}
    return weight_map, metadata if isinstance(metadata, dict) else {}


def _open_sharded(index_path: Path, layout: str) -> CheckpointReader:
    weight_map, metadata = _read_index(index_path)
    folder = index_path.parent
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    files: dict[Path, TensorReader] = {}
    try:
        for shard in sorted(by_shard):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: names shard {shard!r}, which is missing")
            files[shard_path] = _open_file(shard_path)
        for shard, want in by_shard.items():
            shard_path = folder / shard
            reader = files[shard_path]
            missing = [k for k in want if k not in reader]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(
                    f"{shard_path}: tensor {missing[0]!r}{more} is listed in {index_path.name} "
                    "but not stored in this shard"
                )
            extra = len(reader) - len(want)
            if extra:
                logger.warning(
                    "%s: %d tensor(s) not listed in %s are ignored",
                    shard_path,
                    extra,
                    index_path.name,
                )
    except BaseException:
        for reader in files.values():
            reader.close()
        raise
    key_to_file = {k: folder / v for k, v in weight_map.items()}
    return CheckpointReader(folder, layout, files, key_to_file, metadata)


def _open_files(path: Path, paths: list[Path], layout: str) -> CheckpointReader:
    """Several weight files without an index: their union, each name at most once."""
    files: dict[Path, TensorReader] = {}
    key_to_file: dict[str, Path] = {}
    try:
        for p in paths:
            reader = files[p] = _open_file(p)
            for key in reader:
                if key in key_to_file:
                    raise CheckpointError(
                        f"{p}: tensor {key!r} is also stored in {key_to_file[key].name}"
                    )
                key_to_file[key] = p
    except BaseException:
        for reader in files.values():
            reader.close()
        raise
    metadata: Mapping[str, object] = {}
    if len(files) == 1 and isinstance(first := next(iter(files.values())), SafetensorsFile):
        metadata = first.metadata
    return CheckpointReader(path, layout, files, key_to_file, metadata)


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open the weights of a checkpoint folder (or one weight file, or an index file).

    A folder is searched as transformers does: `model.safetensors`, then
    `model.safetensors.index.json`, then `pytorch_model.bin`, then
    `pytorch_model.bin.index.json`; failing those, every `*.safetensors` file (or else every
    `pytorch_model*.bin` file) in it, with no tensor name stored twice. Raises `CheckpointError`.
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            kind = "safetensors" if ".safetensors" in path.name else "torch"
            return _open_sharded(path, f"{kind}-sharded")
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        return _open_files(path, [path], kind)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    candidates = [
        (SAFE_WEIGHTS_NAME, "safetensors"),
        (SAFE_WEIGHTS_INDEX_NAME, "safetensors-sharded"),
        (TORCH_WEIGHTS_NAME, "torch"),
        (TORCH_WEIGHTS_INDEX_NAME, "torch-sharded"),
    ]
    for name, layout in candidates:
        p = path / name
        if p.is_file():
            logger.debug("%s: %s layout", path, layout)
            if name.endswith(".index.json"):
                return _open_sharded(p, layout)
            return _open_files(path, [p], layout)
    for pattern, layout in (("*.safetensors", "safetensors"), ("pytorch_model*.bin", "torch")):
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if found:
            if len(found) > 1:
                layout += "-sharded"
            return _open_files(path, found, layout)
    raise CheckpointError(
        f"{path}: no weights found (expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
        f"{TORCH_WEIGHTS_NAME} or {TORCH_WEIGHTS_INDEX_NAME})"
    )
