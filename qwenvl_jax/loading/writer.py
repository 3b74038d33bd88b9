"""Write safetensors checkpoints as transformers' `save_pretrained` lays them out, streaming.

`write_safetensors(folder, tensors)` takes (name, array) pairs one at a time and writes
`model.safetensors`, or, when they do not fit in one shard of `max_shard_bytes`,
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`. Tensors are grouped by
huggingface_hub's rule (a shard is closed when the next tensor would push it past the limit; a
tensor larger than the limit gets a shard of its own). Only one tensor is in memory at a time.
A safetensors header must precede the data, so either a `plan` of (name, shape, dtype) is given
and every header is written up front, or each shard's data goes to a temporary file first and is
copied behind its header once the shard is complete. Files appear under their final names only
when complete (written under a temporary name, then renamed).

`atomic_dir(dst)` gives a whole output folder the same all-or-nothing behaviour.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qwenvl_jax import multihost
from qwenvl_jax.errors import InputError
from qwenvl_jax.loading.fp8 import as_dtype
from qwenvl_jax.loading.reader import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SAFETENSORS_DTYPES,
)

logger = logging.getLogger(__name__)

_DTYPE_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_COPY_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class WriteResult:
    """What `write_safetensors` wrote: file names in shard order, key -> file, bytes of data."""

    files: list[str]
    weight_map: dict[str, str]
    total_size: int
    total_parameters: int


def shard_name(index: int, count: int) -> str:
    """`model.safetensors` for a single shard, else `model-0000k-of-0000n.safetensors` (1-based)."""
    return SAFE_WEIGHTS_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors code ("F32", "BF16", "F8_E4M3", ...) of a numpy dtype."""
    try:
        return _DTYPE_CODES[as_dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass
class _Shard:
    """One shard being assembled: header entries in data order, and its open data file."""

    entries: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)
    size: int = 0
    data_path: Path | None = None
    file: BinaryIO | None = None

    def header(self, metadata: Mapping[str, str]) -> bytes:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for key, code, shape, nbytes in self.entries:
            header[key] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors does
        return len(raw).to_bytes(8, "little") + raw


class _Planner:
    """huggingface_hub's sharding rule, fed one tensor size at a time."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.closed: list[int] = []  # shard ids in the order they were closed (= file order)
        self._next = 0
        self._current: int | None = None
        self._current_size = 0

    def add(self, nbytes: int) -> tuple[int, int | None]:
        """The shard id for a tensor, and the id of a shard this closes (or None)."""
        if nbytes > self.max_bytes:
            shard = self._new()
            self.closed.append(shard)
            return shard, shard
        closed = None
        if self._current is not None and self._current_size + nbytes > self.max_bytes:
            closed = self._current
            self.closed.append(closed)
            self._current = None
        if self._current is None:
            self._current, self._current_size = self._new(), 0
        self._current_size += nbytes
        return self._current, closed

    def finish(self) -> int | None:
        last = self._current
        if last is not None:
            self.closed.append(last)
        elif not self.closed:  # no tensors at all: still one (empty) file
            last = self._new()
            self.closed.append(last)
        self._current = None
        return last

    def _new(self) -> int:
        self._next += 1
        return self._next - 1


def _prepare(key: object, array: Any) -> tuple[str, tuple[int, ...], str, np.ndarray]:
    """(key, shape, dtype code, little-endian bytes as uint8[n])."""
    if not isinstance(key, str):
        raise ValueError(f"tensor names must be strings, got {key!r}")
    a = np.asarray(array)
    shape = tuple(int(d) for d in a.shape)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    try:
        code = safetensors_dtype(a.dtype.newbyteorder("="))
    except ValueError as e:
        raise ValueError(f"tensor {key!r}: {e}") from None
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return key, shape, code, flat


def _copy_into(src: BinaryIO, dst: BinaryIO, nbytes: int) -> None:
    """Append `nbytes` of `src` (from its start) to `dst`, in the kernel where possible."""
    src.seek(0)
    dst.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done)
                if n == 0:
                    break
                done += n
        except OSError:
            src.seek(done)
            dst.seek(0, os.SEEK_END)
    while done < nbytes:
        chunk = src.read(min(_COPY_CHUNK, nbytes - done))
        if not chunk:
            raise OSError(f"{src.name}: ended early while copying shard data")
        dst.write(chunk)
        done += len(chunk)


def _close_all(shards: Mapping[int, _Shard]) -> None:
    for shard in shards.values():
        if shard.file is not None:
            shard.file.close()


def _write_streamed(
    folder: Path,
    tensors: Iterable[tuple[str, Any]],
    max_shard_bytes: int,
    metadata: Mapping[str, str],
    temps: list[Path],
) -> list[_Shard]:
    planner = _Planner(max_shard_bytes)
    shards: dict[int, _Shard] = {}
    seen: set[str] = set()
    try:
        for raw_key, array in tensors:
            key, shape, code, data = _prepare(raw_key, array)
            if key in seen:
                raise ValueError(f"tensor {key!r} is given twice")
            seen.add(key)
            shard_id, closed = planner.add(data.nbytes)
            if shard_id not in shards:
                path = folder / f".tmp-{os.getpid()}-{shard_id}.safetensors.data"
                temps.append(path)
                shards[shard_id] = _Shard(data_path=path, file=open(path, "wb"))  # noqa: SIM115
            shard = shards[shard_id]
            assert shard.file is not None
            shard.file.write(memoryview(data))
            shard.entries.append((key, code, shape, data.nbytes))
            shard.size += data.nbytes
            del data, array
            if closed is not None:
                _close_all({closed: shards[closed]})
    finally:
        _close_all(shards)
    last = planner.finish()
    if last is not None and last not in shards:
        shards[last] = _Shard()
    ordered = [shards[i] for i in planner.closed]
    for i, shard in enumerate(ordered):
        name = shard_name(i, len(ordered))
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        temps.append(tmp)
        with open(tmp, "wb") as out:
            out.write(shard.header(metadata))
            if shard.data_path is not None:
                with open(shard.data_path, "rb") as src:
                    _copy_into(src, out, shard.size)
        if shard.data_path is not None:
            shard.data_path.unlink()
        logger.info("wrote %s (%d tensors, %d bytes)", name, len(shard.entries), shard.size)
    return ordered


def _write_planned(
    folder: Path,
    tensors: Iterable[tuple[str, Any]],
    plan: Sequence[tuple[str, Sequence[int], Any]],
    max_shard_bytes: int,
    metadata: Mapping[str, str],
    temps: list[Path],
) -> list[_Shard]:
    planner = _Planner(max_shard_bytes)
    shards: dict[int, _Shard] = {}
    shard_of: list[int] = []
    for key, shape, dtype in plan:
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * as_dtype(dtype).itemsize
        shard_id, _ = planner.add(nbytes)
        shards.setdefault(shard_id, _Shard()).entries.append(
            (key, safetensors_dtype(dtype), shape, nbytes)
        )
        shards[shard_id].size += nbytes
        shard_of.append(shard_id)
    last = planner.finish()
    if last is not None and last not in shards:
        shards[last] = _Shard()
    if len({k for k, _, _ in plan}) != len(plan):
        raise ValueError("the plan names a tensor twice")
    order = {shard_id: i for i, shard_id in enumerate(planner.closed)}
    count = len(order)
    remaining = {shard_id: len(s.entries) for shard_id, s in shards.items()}

    def open_shard(shard_id: int) -> _Shard:
        shard = shards[shard_id]
        if shard.file is None:
            name = shard_name(order[shard_id], count)
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            temps.append(tmp)
            shard.file = open(tmp, "wb")  # noqa: SIM115
            shard.file.write(shard.header(metadata))
        return shard

    written = 0
    try:
        for raw_key, array in tensors:
            if written >= len(plan):
                raise ValueError(f"tensor {raw_key!r} is not in the plan")
            key, shape, code, data = _prepare(raw_key, array)
            want_key, want_shape, want_dtype = plan[written]
            want = (want_key, tuple(int(d) for d in want_shape), safetensors_dtype(want_dtype))
            if (key, shape, code) != want:
                raise ValueError(
                    f"tensor {key!r} {list(shape)} {code} differs from plan entry {written}: "
                    f"{want[0]!r} {list(want[1])} {want[2]}"
                )
            shard_id = shard_of[written]
            shard = open_shard(shard_id)
            assert shard.file is not None
            shard.file.write(memoryview(data))
            del data, array
            written += 1
            remaining[shard_id] -= 1
            if remaining[shard_id] == 0:
                shard.file.close()
        if written != len(plan):
            raise ValueError(f"only {written} of the {len(plan)} planned tensors were given")
        for shard_id in shards:
            open_shard(shard_id)  # the header-only file of an empty checkpoint
    finally:
        _close_all(shards)
    return [shards[i] for i in planner.closed]


def write_safetensors(
    folder: str | os.PathLike[str],
    tensors: Iterable[tuple[str, Any]],
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    *,
    plan: Sequence[tuple[str, Sequence[int], Any]] | None = None,
) -> WriteResult:
    """Stream (name, array) pairs into `folder` as transformers' safetensors layout.

    `metadata` (default `{"format": "pt"}`, which transformers expects) goes into every file's
    `__metadata__`. With `plan` (a list of (name, shape, dtype) in the order `tensors` will
    yield them), headers are written first and data is written once; without it, each shard's
    data is staged in a temporary file in `folder`. Weight files of an earlier save in `folder`
    that this save does not rewrite (other shard counts, an old index) are removed, as
    `save_pretrained` does. Arrays may be numpy, ml_dtypes (bfloat16, float8) or anything
    `np.asarray` accepts (jax arrays).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    temps: list[Path] = []
    try:
        if plan is None:
            shards = _write_streamed(folder, tensors, max_shard_bytes, meta, temps)
        else:
            shards = _write_planned(folder, tensors, plan, max_shard_bytes, meta, temps)
        names = [shard_name(i, len(shards)) for i in range(len(shards))]
        for name in names:
            os.replace(folder / f".{name}.tmp-{os.getpid()}", folder / name)
        weight_map = {key: name for shard, name in zip(shards, names) for key, *_ in shard.entries}
        total_size = sum(shard.size for shard in shards)
        total_parameters = sum(
            math.prod(shape) for shard in shards for _, _, shape, _ in shard.entries
        )
        if len(names) > 1:
            index = {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            tmp = folder / f".{SAFE_WEIGHTS_INDEX_NAME}.tmp-{os.getpid()}"
            temps.append(tmp)
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, folder / SAFE_WEIGHTS_INDEX_NAME)
            names_written = [*names, SAFE_WEIGHTS_INDEX_NAME]
        else:
            names_written = names
    finally:
        for path in temps:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for stale in folder.iterdir():
        is_weights = _WEIGHT_FILE.fullmatch(stale.name) or stale.name == SAFE_WEIGHTS_INDEX_NAME
        if is_weights and stale.name not in names_written:
            logger.info("removing %s, left by an earlier save", stale)
            stale.unlink()
    return WriteResult(names, weight_map, total_size, total_parameters)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a possible process id
        return False
    return True


def _remove_stale_temps(dst: Path) -> None:
    """Remove the `.<dst name>.tmp-<pid>` folders of `atomic_dir` calls whose process no longer
    runs on this machine (an interrupted convert or export); those of running processes stay."""
    stale = re.compile(rf"\.{re.escape(dst.name)}\.tmp-(\d+)")
    for entry in dst.parent.iterdir():
        match = stale.fullmatch(entry.name)
        if match is None or _pid_alive(int(match[1])):
            continue
        logger.info("removing %s, left by an interrupted run (process %s)", entry, match[1])
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of `dst`; on success it becomes `dst`, on error it goes.

    The temporary folder is `dst.parent / f".{dst.name}.tmp-<pid>"`, on the same file system, so
    the final step is a rename and nothing half-written is ever seen at `dst`. An existing
    non-empty `dst` is refused (`InputError`) unless `overwrite=True`, in which case it is
    replaced only once the new folder is complete. Temporary folders of earlier writes of `dst`
    whose process is gone (killed, crashed) are removed first; the process ids are those of
    this machine. A multi-process run writes one folder together (named after the first
    process, which prepares and renames it; the others wait for it at each step).
    """
    dst = Path(dst)
    # on a multi-process run all processes write into one folder (Orbax writes each array's
    # shards from the process that holds them); the first process prepares and renames it
    lead = multihost.is_lead()
    pid = multihost.gather_json(os.getpid())[0]
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise InputError(f"{dst}: folder exists and is not empty (overwrite it explicitly)")
    tmp = dst.parent / f".{dst.name}.tmp-{pid}"
    if lead:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(dst)
        if tmp.exists():  # left by a crashed run that had the same pid
            shutil.rmtree(tmp)
        tmp.mkdir()
    multihost.barrier(f"{tmp.name}:ready")
    try:
        yield tmp
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost.barrier(f"{tmp.name}:written")
    if lead:
        try:
            if dst.is_dir():
                old = dst.parent / f".{dst.name}.old-{pid}"
                os.rename(dst, old)
                os.rename(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    multihost.barrier(f"{tmp.name}:renamed")
    logger.debug("%s: written", dst)
