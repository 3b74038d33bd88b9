"""Our Orbax checkpoint folders: save parameters in bounded groups, restore straight into shardings.

A folder written here holds `params/` (an Orbax PyTree checkpoint of every parameter, a nested
dict keyed by the parts of the dotted parameter path, `{"language_model": {"layers": {"0": ...}}}`,
one entry per decoder layer and ViT block: the model's stacked layers are unstacked on save and
stacked back on restore, see loading/stacking.py),
`qwenvl_jax.json` (the marker: format, family, dtype, and what the weights were converted from),
config.json (the Hugging Face config, or our own `ModelConfig.to_dict()` format) and the
tokenizer/processor files.

Parameters are written with Orbax's partial save: each group of at most `chunk_bytes` (256 MiB,
more for models past 32 GB, see `chunk_size`) is saved and freed before the next is built, so a
model never has to be whole in memory; arrays sharded over a
multi-host mesh are written by the processes that hold their shards. Restoring passes Orbax
abstract targets that carry each parameter's `NamedSharding`, so every array is read straight
into its shards on the mesh.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from qwenvl_jax.errors import CheckpointError

logger = logging.getLogger(__name__)

MARKER_NAME = "qwenvl_jax.json"
PARAMS_DIR = "params"
FORMAT = "qwenvl_jax.orbax"
FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Each Orbax partial save reads the metadata of every earlier one, so their number is bounded:
# groups grow past DEFAULT_CHUNK_BYTES for models over 32 GB (3.7 GB groups for 235B in bf16).
MAX_GROUPS = 128


def _ocp():
    # Imported on first use: orbax is heavy and only checkpoint I/O needs it.
    from orbax.checkpoint.experimental import v1 as ocp

    return ocp


def _save_context():
    """Orbax options for our saves. Uncompressed: weights gain little from zstd, and its
    buffers would add about a group's size to peak memory and slow every save and restore."""
    ctx = _ocp().Context()
    ctx.array.saving.use_compression = False
    return ctx


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def is_orbax_folder(folder: str | os.PathLike[str]) -> bool:
    """True when `folder` was written by `save_model` (`convert`, training's model export)."""
    folder = Path(folder)
    return (folder / MARKER_NAME).is_file() and (folder / PARAMS_DIR).is_dir()


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker of an Orbax folder: {"format", "version", "family", "dtype", "source"?, ...}."""
    path = Path(folder) / MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} marker")
    if marker.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {marker['version']} is newer than this qwenvl_jax "
            f"({FORMAT_VERSION})"
        )
    return marker


def write_marker(folder: str | os.PathLike[str], **fields: Any) -> None:
    """Write the marker (last, so a folder is recognised only once its parameters are complete)."""
    if jax.process_index() != 0:
        return
    marker = {"format": FORMAT, "version": FORMAT_VERSION, **fields}
    path = Path(folder) / MARKER_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b.0.c": x} -> {"a": {"b": {"0": {"c": x}}}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def model_params(model: nnx.Module) -> dict[str, Any]:
    """{dotted model path: value} of every variable of `model` (arrays, or ShapeDtypeStructs);
    stacked decoder layers as one [n, ...] value per run."""
    state = nnx.state(model)
    return {
        ".".join(str(p) for p in path): v.get_raw_value() for path, v in nnx.to_flat_state(state)
    }


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """{checkpoint path: value} of every variable of `model`: one entry per decoder layer and ViT
    block (`stacking.checkpoint_view`; a device array's layers are `LayerSlice`s, taken on use)."""
    from qwenvl_jax.loading.stacking import checkpoint_view

    return checkpoint_view(model_params(model), model.config)


def chunk_size(total_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The group size for saving `total_bytes`: `chunk_bytes`, or more to stay within
    MAX_GROUPS partial saves."""
    return max(chunk_bytes, -(-total_bytes // MAX_GROUPS))


def group_by_size(items: Iterable[tuple[str, int]], limit: int) -> Iterator[list[str]]:
    """Consecutive groups of names whose sizes sum to at most `limit` (a larger item alone)."""
    group: list[str] = []
    size = 0
    for name, nbytes in items:
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def _groups(params: Mapping[str, Any], chunk_bytes: int) -> Iterator[dict[str, Any]]:
    sizes = [(p, int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize) for p, a in params.items()]
    limit = chunk_size(sum(n for _, n in sizes), chunk_bytes)
    from qwenvl_jax.loading.stacking import materialize

    return ({p: materialize(params[p]) for p in names} for names in group_by_size(sizes, limit))


def save_param_groups(
    groups: Iterable[Mapping[str, Any]], directory: str | os.PathLike[str]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Write groups of {dotted path: array} as one Orbax checkpoint at `directory`.

    Each group is saved (Orbax partial save) and dropped before the next is asked for, so a lazy
    `groups` keeps memory near one group. Returns {path: (shape, dtype name)} of what was written.
    """
    ocp = _ocp()
    directory = Path(directory).absolute()
    # A partial save continues any unfinished one at the same path: start from nothing.
    stale = sorted(directory.parent.glob(f"{directory.name}*"))
    if stale:
        raise CheckpointError(f"{stale[0]}: already exists (save into a new folder)")
    written: dict[str, tuple[tuple[int, ...], str]] = {}
    for group in groups:
        for path, array in group.items():
            if path in written:
                raise CheckpointError(f"parameter {path} is written twice")
            written[path] = (tuple(array.shape), np.dtype(array.dtype).name)
        try:
            with _save_context():
                ocp.partial.save(directory, _nest(group))
        except Exception as e:  # Orbax/tensorstore failures: disk full, permissions
            raise CheckpointError(f"{directory}: Orbax save failed ({_one_line(e)})") from e
        del group  # before the next group is made
    if not written:
        raise CheckpointError(f"{directory}: no parameters to save")
    try:
        with _save_context():
            ocp.partial.finalize(directory)
    except Exception as e:
        raise CheckpointError(f"{directory}: Orbax finalize failed ({_one_line(e)})") from e
    return written


def save_model(
    model_or_params: nnx.Module | Mapping[str, Any] | Iterable[Mapping[str, Any]],
    folder: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    family: str | None = None,
    dtype: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **marker_fields: Any,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Save a model, a {dotted path: array} mapping, or an iterable of such mappings (groups,
    made lazily: each is saved and dropped before the next) as an Orbax folder `folder`.

    `config` is written as config.json: a Hugging Face config dict, so processors and
    `convert --to hf` keep working; left out for a model, its `ModelConfig.to_dict()` is written.
    `folder` must not hold a checkpoint yet (wrap the call in `loading.writer.atomic_dir` for an
    all-or-nothing write). Must be called on every process of a multi-host run; each writes the
    shards it holds and process 0 writes the files. Returns {path: (shape, dtype)} written.
    """
    folder = Path(folder)
    if isinstance(model_or_params, nnx.Module):
        model = model_or_params
        model_config = getattr(model, "config", None)
        if config is None and model_config is not None:
            config = model_config.to_dict()
        family = family or getattr(model_config, "family", None)
        groups: Iterable[Mapping[str, Any]] = _groups(flat_params(model), chunk_bytes)
    elif isinstance(model_or_params, Mapping):
        groups = _groups(model_or_params, chunk_bytes)
    else:
        groups = model_or_params
    if config is None or family is None:
        raise ValueError("save_model of parameters without a model needs config= and family=")
    if (folder / PARAMS_DIR).exists():
        raise CheckpointError(f"{folder / PARAMS_DIR}: already exists (save into a new folder)")
    folder.mkdir(parents=True, exist_ok=True)
    written = save_param_groups(groups, folder / PARAMS_DIR)
    if dtype is None:
        dtypes = {d for _, d in written.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    if jax.process_index() == 0:
        tmp = folder / f".config.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "config.json")
    write_marker(folder, family=family, dtype=dtype, **marker_fields)
    logger.info("%s: %d parameters saved (%s)", folder, len(written), dtype)
    return written


def stored_params(folder: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{dotted path: (shape, dtype)} of the parameters in an Orbax folder, from its metadata."""
    ocp = _ocp()
    directory = Path(folder).absolute() / PARAMS_DIR  # Orbax takes absolute paths only
    try:
        tree = ocp.metadata(directory).metadata
    except Exception as e:
        raise CheckpointError(f"{directory}: unreadable Orbax metadata ({_one_line(e)})") from e
    out = {}
    for path, meta in _flatten(tree).items():
        out[path] = (tuple(meta.shape), np.dtype(meta.dtype))
    return out


def check_stored(
    folder: str | os.PathLike[str],
    targets: Mapping[str, Any],
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    expected_by: str = "the model",
) -> None:
    """An error naming the first parameter of `targets` (path -> anything with a .shape) that
    the folder's stored metadata lacks or holds with another shape."""
    for path, target in targets.items():
        if path not in stored:
            raise CheckpointError(f"{folder}: checkpoint lacks parameter {path}")
        if tuple(stored[path][0]) != tuple(target.shape):
            raise CheckpointError(
                f"{folder}: parameter {path} is stored with shape {list(stored[path][0])}, "
                f"{expected_by} expects {list(target.shape)}"
            )


def restore_params(
    folder: str | os.PathLike[str],
    targets: Mapping[str, Any],
    *,
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, Any]:
    """Read the parameters named in `targets` from an Orbax folder.

    `targets` maps dotted paths to `jax.ShapeDtypeStruct`s (with a sharding: the array is read
    straight into its shards, cast to the target dtype) or to `np.ndarray`s (read to host
    memory). Shapes are checked against the stored metadata first; an error names the first
    parameter that is missing or mis-shaped. Other stored parameters are left unread.
    """
    ocp = _ocp()
    directory = Path(folder).absolute() / PARAMS_DIR
    stored = stored_params(folder) if stored is None else stored
    check_stored(folder, targets, stored)
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = len(targets) < len(stored)
    try:
        with ctx:
            tree = ocp.load(directory, _nest(targets))
    except Exception as e:
        raise CheckpointError(f"{directory}: Orbax restore failed ({_one_line(e)})") from e
    return _flatten(tree)


def restore_model(
    folder: str | os.PathLike[str],
    abstract_model: nnx.Module,
    *,
    group_bytes: int = DEFAULT_CHUNK_BYTES,
) -> nnx.Module:
    """The model of `abstract_model` (ShapeDtypeStruct leaves with shardings, as
    `build_model(..., abstract=True)` makes) with every variable read from an Orbax folder,
    each straight into its sharded array in the abstract leaf's dtype. Per-layer entries are read
    a group of at most `group_bytes` at a time and written into the stacked layers in place."""
    from qwenvl_jax.loading.stacking import Stacker, checkpoint_view

    folder = Path(folder)
    graphdef, abs_state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(abs_state))
    model_targets = {}
    for path, var in flat:
        leaf = var.get_raw_value()
        sharding = getattr(leaf, "sharding", None)
        model_targets[".".join(str(p) for p in path)] = jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=sharding
        )
    targets = checkpoint_view(model_targets, abstract_model.config)
    stored = stored_params(folder)
    extra = sorted(set(stored) - set(targets))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{folder}: stored parameter {extra[0]}{more} is not a parameter of this model"
        )
    check_stored(folder, targets, stored)
    stacker = Stacker(model_targets, abstract_model.config)
    sizes = ((p, int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize) for p, t in targets.items())
    for group in group_by_size(sizes, group_bytes):
        arrays = restore_params(folder, {p: targets[p] for p in group}, stored=stored)
        for path in group:
            stacker.put(path, arrays.pop(path))
        del arrays
    values = stacker.result()
    state = nnx.from_flat_state(
        [(path, var.replace(values[".".join(str(p) for p in path)])) for path, var in flat]
    )
    logger.info("%s: %d parameters restored", folder, len(targets))
    return nnx.merge(graphdef, state)


def read_params(
    folder: str | os.PathLike[str],
    paths: Iterable[str],
    dtype: Any = None,
    *,
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> dict[str, np.ndarray]:
    """{path: host numpy array} of the named parameters, in `dtype` (default: as stored)."""
    stored = stored_params(folder) if stored is None else stored
    targets = {}
    for path in paths:
        if path not in stored:
            raise CheckpointError(f"{folder}: checkpoint lacks parameter {path}")
        shape, stored_dtype = stored[path]
        # np.empty only names shape and dtype for Orbax: its pages are never touched.
        targets[path] = np.empty(shape, stored_dtype if dtype is None else np.dtype(dtype))
    return {p: np.asarray(a) for p, a in restore_params(folder, targets, stored=stored).items()}


def iter_params(
    folder: str | os.PathLike[str],
    paths: Iterable[str],
    dtype: Any = None,
    *,
    group_bytes: int = DEFAULT_CHUNK_BYTES,
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(path, host array) for `paths` in order, read a group of at most `group_bytes` at a time."""
    stored = stored_params(folder) if stored is None else stored
    for group in group_by_size(((p, param_bytes(stored, p, dtype)) for p in paths), group_bytes):
        arrays = read_params(folder, group, dtype, stored=stored)
        for path in group:
            yield path, arrays.pop(path)
        del arrays


def param_bytes(
    stored: Mapping[str, tuple[tuple[int, ...], np.dtype]], path: str, dtype: Any = None
) -> int:
    """Bytes of a stored parameter read in `dtype` (0 for an unknown path)."""
    if path not in stored:
        return 0
    shape, stored_dtype = stored[path]
    return int(np.prod(shape)) * np.dtype(stored_dtype if dtype is None else dtype).itemsize
