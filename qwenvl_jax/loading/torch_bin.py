"""Read PyTorch `.bin` checkpoints (the zip format of `torch.save`) without torch.

A `torch.save` zip holds `<prefix>/data.pkl`, a pickle of the state dict in which every tensor
is a call to `torch._utils._rebuild_tensor_v2/v3(storage, offset, size, stride, ...)` and every
storage a persistent id `("storage", <storage type>, key, location, numel)` whose bytes are the
zip member `<prefix>/data/<key>`. The pickle is read by a restricted unpickler that resolves only
those few globals, to harmless stand-ins of our own, and refuses any other (`os.system`,
`builtins.eval`, ...) with a `CheckpointError`, so no pickled code ever runs. Tensors are
described at open time and read one at a time: only the byte range a tensor spans in its storage
is read, straight from the file for the uncompressed members torch writes, and strides and
offsets (views, transposes, shared storages) are honoured.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading.reader import MissingTensorError, TensorInfo, TensorReader, read_exact

_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# The legacy typed-storage classes torch still names in pickles, and their element types.
_STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
}


class _Refused(Exception):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


class _Sealed:
    """Stand-in objects refuse pickle's BUILD, so a pickle cannot rewrite them."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise _Refused(f"refusing to set the state of {self!r}")


class _TorchGlobal(_Sealed):
    """What `torch.<X>Storage`, `torch.<dtype>` or `torch.Tensor` resolve to: a plain marker."""

    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: np.dtype | None = None) -> None:
        self.kind, self.name, self.dtype = kind, name, dtype

    def __repr__(self) -> str:
        return f"<torch {self.kind} {self.name}>"


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype  # element type of the storage (uint8 for an untyped storage)
    nbytes: int

    def __setstate__(self, state: object) -> None:
        raise _Refused("refusing to set the state of a storage")


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements of dtype
    dtype: np.dtype

    def __setstate__(self, state: object) -> None:
        raise _Refused("refusing to set the state of a tensor")

    @property
    def extent(self) -> int:
        """Elements spanned in the storage from `offset` (0 for an empty tensor)."""
        if math.prod(self.shape) == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _int_tuple(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in x):
        raise _Refused(f"bad tensor {what} {x!r}")
    return tuple(x)


def _check_metadata(metadata: object) -> None:
    if metadata and any(bool(v) for v in dict(metadata).values()):  # type: ignore[call-overload]
        raise _Refused(f"tensors with conj/neg bits set are not supported ({metadata!r})")


def _make_ref(storage: object, offset: object, size: object, stride: object, dtype: np.dtype):
    if not isinstance(storage, _Storage):
        raise _Refused(f"tensor data is {type(storage).__name__}, not a storage")
    if not isinstance(offset, int) or offset < 0:
        raise _Refused(f"bad storage offset {offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _Refused(f"size {shape} and stride {strides} differ in length")
    return _TensorRef(storage, offset, shape, strides, dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise _Refused("tensor data is not a storage")
    return _make_ref(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    _check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    _check_metadata(metadata)
    if not isinstance(dtype, _TorchGlobal) or dtype.kind != "dtype":
        raise _Refused(f"bad tensor dtype {dtype!r}")
    return _make_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRef):
        raise _Refused("parameter data is not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _Function(_Sealed):
    """An allowed function as the pickle sees it: callable, but sealed against BUILD, which
    could otherwise rewrite a plain function's attributes (its `__defaults__`, say)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<allowed {self.fn.__name__}>"


_REBUILD_FUNCTIONS = {
    fn.__name__: _Function(fn)
    for fn in (
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_parameter_with_state,
    )
}


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch uses this for tensor subclasses; only plain Tensor / Parameter are accepted.
    is_tensor_type = isinstance(new_type, _TorchGlobal) and new_type.kind == "tensor type"
    if not any(func is f for f in _REBUILD_FUNCTIONS.values()) or not is_tensor_type:
        raise _Refused(f"refusing tensor type {new_type!r}")
    if not isinstance(args, tuple):
        raise _Refused("bad tensor arguments")
    return func(*args)


def _torch_size(dims=()):
    return _int_tuple(tuple(dims), "size")


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._tensor", "_rebuild_from_type_v2"): _Function(_rebuild_from_type_v2),
        ("torch", "Size"): _Function(_torch_size),
    }
    for name, fn in _REBUILD_FUNCTIONS.items():
        allowed[("torch._utils", name)] = fn
    for name, dtype in _DTYPES.items():
        allowed[("torch", name)] = _TorchGlobal("dtype", name, dtype)
    for name, dtype_name in _STORAGE_TYPES.items():
        allowed[("torch", name)] = _TorchGlobal("storage", name, _DTYPES[dtype_name])
    untyped = _TorchGlobal("storage", "UntypedStorage", np.dtype(np.uint8))
    allowed[("torch", "UntypedStorage")] = untyped
    allowed[("torch.storage", "UntypedStorage")] = untyped
    for module, name in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
        allowed[(module, name)] = _TorchGlobal("tensor type", f"{module}.{name}")
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; storages become `_Storage` records."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load global '{module}.{name}' from the pickle "
                "(only tensor-rebuilding globals are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, _TorchGlobal) and storage_type.kind == "storage"):
            raise _Refused(f"unknown storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Refused(f"bad storage record {pid!r}")
        assert storage_type.dtype is not None
        return _Storage(key, storage_type.dtype, numel * storage_type.dtype.itemsize)


def _looks_legacy(head: bytes) -> bool:
    """A pre-1.6 torch.save file: a bare pickle stream or a tar archive."""
    return head[:1] == b"\x80" or head[257:262] == b"ustar"


class TorchBinFile(TensorReader):
    """One `torch.save` zip file, read lazily and safely; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _open(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 512, 0)
        if not head:
            raise self._error("empty file")
        if not head.startswith(b"PK"):
            if _looks_legacy(head):
                raise self._error(
                    "unsupported legacy (non-zip, torch < 1.6) torch.save format; re-save it "
                    "with a current torch or convert it to safetensors"
                )
            raise self._error("not a torch.save zip archive")
        try:
            self._zip = zipfile.ZipFile(self.path)
            pkl_names = [n for n in self._zip.namelist() if n.endswith("data.pkl")]
            pkl_names = [n for n in pkl_names if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pkl_names:
                raise self._error("no data.pkl in the zip archive; not a torch.save file")
            pkl_name = min(pkl_names, key=len)
            prefix = pkl_name[: -len("data.pkl")]
            names = set(self._zip.namelist())
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = self._zip.read(prefix + "byteorder").decode("ascii", "replace").strip()
            pickled = self._zip.read(pkl_name)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
            raise self._error(f"corrupt or truncated zip archive ({e})") from None
        if byteorder not in ("little", "big"):
            raise self._error(f"unknown byteorder {byteorder!r}")
        self._swap = byteorder != ("little" if np.little_endian else "big")
        self._refs = self._unpickle(pickled)
        self._members: dict[str, tuple[zipfile.ZipInfo, int | None]] = {}
        for key, ref in self._refs.items():
            skey = ref.storage.key
            if skey not in self._members:
                self._members[skey] = self._locate(prefix + "data/" + skey, size)
            zinfo = self._members[skey][0]
            if zinfo.file_size < ref.storage.nbytes:
                raise self._error(
                    f"storage {zinfo.filename} holds {zinfo.file_size} bytes, fewer than the "
                    f"{ref.storage.nbytes} its record says (truncated?)"
                )
            end = (ref.offset + ref.extent) * ref.dtype.itemsize
            if ref.extent and end > ref.storage.nbytes:
                raise self._error(
                    f"tensor {key!r} spans bytes up to {end} of a {ref.storage.nbytes}-byte storage"
                )
        self._infos = {k: TensorInfo(r.shape, r.dtype, self.path) for k, r in self._refs.items()}
        self._keys = sorted(self._infos)

    def _unpickle(self, data: bytes) -> dict[str, _TensorRef]:
        try:
            obj = _RestrictedUnpickler(io.BytesIO(data)).load()
        except _Refused as e:
            raise self._error(str(e)) from None
        except Exception as e:  # any malformed pickle
            raise self._error(f"corrupt data.pkl ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise self._error(f"holds a {type(obj).__name__}, not a state dict of tensors")
        refs: dict[str, _TensorRef] = {}
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, _TensorRef):
                raise self._error(
                    f"entry {key!r} is a {type(value).__name__}, not a tensor; expected a flat "
                    "state dict"
                )
            refs[key] = value
        return refs

    def _locate(self, name: str, file_size: int) -> tuple[zipfile.ZipInfo, int | None]:
        """The member and, when it is stored uncompressed, its data's byte offset in the file."""
        assert self._zip is not None and self._fd is not None
        try:
            zinfo = self._zip.getinfo(name)
        except KeyError:
            raise self._error(f"storage {name} is missing from the zip archive") from None
        if zinfo.compress_type != zipfile.ZIP_STORED:
            return zinfo, None
        local = os.pread(self._fd, 30, zinfo.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise self._error(f"corrupt zip archive (bad local header for {name})")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = zinfo.header_offset + 30 + name_len + extra_len
        if start + zinfo.file_size > file_size:
            raise self._error(f"truncated: storage {name} runs past the end of the file")
        return zinfo, start

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {key!r}") from None

    def get(self, key: str) -> np.ndarray:
        self.info(key)  # raises for an unknown key
        if self._fd is None:
            raise self._error("reader is closed")
        ref = self._refs[key]
        if ref.extent == 0:
            return np.empty(ref.shape, ref.dtype)
        itemsize = ref.dtype.itemsize
        buf = np.empty(ref.extent * itemsize, np.uint8)
        self._read_storage(ref.storage.key, ref.offset * itemsize, buf)
        if self._swap and itemsize > 1:
            buf = buf.view(f"u{itemsize}").byteswap().view(np.uint8)
        flat = buf.view(ref.dtype)
        out = np.lib.stride_tricks.as_strided(
            flat, shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride)
        )
        # Copy only when the tensor was a strided view (a transpose, a slice).
        return out if out.flags.c_contiguous else out.copy()

    def _read_storage(self, storage_key: str, start: int, buf: np.ndarray) -> None:
        assert self._fd is not None and self._zip is not None
        zinfo, data_offset = self._members[storage_key]
        if data_offset is not None:
            read_exact(self._fd, buf, data_offset + start, self.path)
            return
        # A compressed member (a re-zipped file): decompress up to the range, under a lock.
        view = memoryview(buf).cast("B")
        with self._lock:
            try:
                with self._zip.open(zinfo) as f:
                    f.seek(start)
                    done = 0
                    while done < len(view):
                        n = f.readinto(view[done:])
                        if not n:
                            raise self._error(f"storage {zinfo.filename} ends early")
                        done += n
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise self._error(f"corrupt zip member {zinfo.filename} ({e})") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
