"""Logical-axis sharding: the one rules table, and how parameters and activations use it.

Every parameter is created with logical axis names (`param(...)` below); `RULES` maps each logical
name to mesh axes of a `Mesh(data, fsdp, tensor, expert)`. Vision axes are named apart from text
axes so that the ViT can shard differently from the LLM. A rule that would put one mesh axis on two
dimensions of one array raises; a parameter dimension that does not divide by its mesh axes is an
error naming the parameter (an activation's is replicated).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenvl_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes (a name, a tuple of names, or None for replicated)
RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vit_tokens", ("data", "fsdp")),
    ("vit_groups", ("data", "fsdp", "expert")),  # a training batch's patch groups, as "batch"
    # text parameters. Weights other than the experts' split their model dimension over
    # `expert` too (as over `fsdp`): the expert axis splits the batch, so it is a data-parallel
    # axis for them, and their gradients are reduce-scattered over it rather than all-reduced.
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("router", None),
    ("norm", None),
    ("layers", None),  # the stacked decoder layers: scanned over, never split across devices
    # vision parameters
    ("vit_patch", None),
    ("vit_embed", ("fsdp", "expert")),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", ("fsdp", "expert")),
    ("vit_pos", None),
    ("vit_queries", None),
)

_abstract_var: contextvars.ContextVar[bool] = contextvars.ContextVar("abstract", default=False)
_rules_var: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("rules", default=None)
_mesh_var: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)
_stack_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("stack", default=None)
_kind_var: contextvars.ContextVar[type] = contextvars.ContextVar("kind", default=nnx.Param)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A Mesh over (data, fsdp, tensor, expert); the product must equal the device count."""
    devices = jax.devices() if devices is None else devices
    shape = (data, fsdp, tensor, expert)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {np.prod(shape)} devices, "
            f"{len(devices)} available"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence | None = None) -> Iterator[None]:
    """Within this context, `shard` constraints and model construction use `mesh` and `rules`."""
    t1 = _mesh_var.set(mesh)
    t2 = _rules_var.set(tuple(rules) if rules is not None else None)
    try:
        yield
    finally:
        _mesh_var.reset(t1)
        _rules_var.reset(t2)


@contextlib.contextmanager
def abstract_params() -> Iterator[None]:
    """Within this context `param` creates ShapeDtypeStruct values: building a model only
    describes it (no initialiser is traced or run), which takes a moment even for 235B."""
    token = _abstract_var.set(True)
    try:
        yield
    finally:
        _abstract_var.reset(token)


@contextlib.contextmanager
def stacked_params(n: int) -> Iterator[None]:
    """Within this context `param` creates `n` layers' parameters at once: shape [n, *shape]
    with the logical axis "layers" in front, each layer initialised from its own key."""
    token = _stack_var.set(n)
    try:
        yield
    finally:
        _stack_var.reset(token)


@contextlib.contextmanager
def param_kind(kind: type) -> Iterator[None]:
    """Within this context `param` creates variables of type `kind` (an nnx.Variable subclass)
    instead of nnx.Param."""
    token = _kind_var.set(kind)
    try:
        yield
    finally:
        _kind_var.reset(token)


def current_mesh() -> Mesh | None:
    return _mesh_var.get()


def target_platform() -> str:
    """The platform of the program being traced: that of the mesh in use (`plan` traces on a
    CPU host for TPU devices), else JAX's default backend."""
    mesh = _mesh_var.get()
    if mesh is not None and mesh.devices.size:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def current_rules() -> tuple:
    return _rules_var.get() or RULES


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence | None = None,
    param_name: str | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, dropping mesh axes absent from or of size 1 in
    `mesh`. A dimension its mesh axes do not divide is an error naming the parameter when
    `param_name` is given (a parameter must not silently end up whole on every device), and is
    replicated for an activation."""
    table = dict(rules or current_rules())
    used: dict[str, int] = {}
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        target = table[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1)
            if shape is not None and targets:
                size = int(np.prod([mesh.shape[t] for t in targets]))
                if shape[i] % size and param_name is not None:
                    raise ConfigError(
                        f"parameter {param_name}: dimension {i} ({name}, size {shape[i]}) does "
                        f"not divide over mesh axes {targets} ({size} devices); pick a mesh "
                        "whose axes divide it"
                    )
                if shape[i] % size:
                    log.debug(
                        "axis %s (%d) not divisible by %s: replicated", name, shape[i], targets
                    )
                    targets = ()
        for t in targets:
            if t in used:
                raise ValueError(
                    f"mesh axis {t!r} used twice in logical axes {tuple(axes)} "
                    f"(dims {used[t]} and {i})"
                )
            used[t] = i
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def shard(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to its logical sharding when a mesh is active; else a no-op."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))


def map_shards(
    fn: Callable, in_axes: Sequence[Sequence[str | None]], out_axes: Sequence[str | None]
) -> Callable:
    """`fn` run on each device's shard of its array arguments, split by their logical axes, when
    a mesh is active (`jax.shard_map`: XLA cannot partition a Pallas TPU kernel itself); else
    `fn`. A logical axis splits only where every dimension named by it divides over its mesh
    axes, so all arguments split it alike. The result (one array) is split by `out_axes`, names
    taken from `in_axes`."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return fn

    def run(*args):
        split: dict[str, Any] = {}
        for axes, a in zip(in_axes, args, strict=True):
            for name, size in zip(axes, a.shape, strict=True):
                if name is None:
                    continue
                (target,) = logical_to_spec((name,), mesh=mesh)
                names = () if target is None else (target,) if isinstance(target, str) else target
                divides = size % int(np.prod([mesh.shape[t] for t in names])) == 0
                split[name] = target if divides and split.get(name, target) == target else None

        def spec(axes):
            return PartitionSpec(*(None if name is None else split[name] for name in axes))

        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=tuple(spec(axes) for axes in in_axes),
            out_specs=spec(out_axes),
            check_vma=False,
        )(*args)

    return run


Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    dtype: Any,
    axes: Sequence[str | None],
) -> nnx.Param:
    """A parameter with its logical axes attached as `sharding_axes` metadata."""
    assert len(axes) == len(shape), (shape, axes)
    n = _stack_var.get()
    if n is not None:
        shape, axes = (n, *shape), ("layers", *axes)
    kind = _kind_var.get()
    if _abstract_var.get():
        return kind(
            jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)),
            sharding_axes=tuple(axes),
            eager_sharding=False,
        )
    key = rngs.params() if rngs is not None else jax.random.key(0)
    if n is None:
        value = init(key, tuple(shape), dtype)
    else:
        value = jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(jax.random.split(key, n))
    return kind(value, sharding_axes=tuple(axes), eager_sharding=False)


def normal(std: float = 0.02) -> Initializer:
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(
        dtype
    )


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    meta = variable.get_metadata()
    return tuple(meta.get("sharding_axes") or (None,) * len(variable.shape))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every Variable of an (abstract or concrete) state; a dimension that
    does not divide over its mesh axes is a ConfigError naming the parameter."""

    def one(path, v):
        name = ".".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        )
        spec = logical_to_spec(axes_of(v), v.shape, mesh, param_name=name)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
