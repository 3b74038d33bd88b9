"""Sparse mixture of experts (Qwen3-VL-MoE, Qwen3.5-MoE): float32 router softmax, top-k,
renormalised, optionally plus a shared SwiGLU expert scaled per token by a sigmoid gate (Qwen3.5).
The routed experts are computed as grouped matmuls over the token copies sorted by expert,
dropless: on CPU a loop of tile-by-expert matmuls (`experts_tiled`), on TPU the megablox
grouped-matmul kernels (`experts_gmm`), elsewhere `jax.lax.ragged_dot` (`experts_ragged`), chosen
by the platform the step is compiled for (so an ahead-of-time compile for a TPU topology from a
CPU host gets the kernels). Under a mesh whose `expert` axis splits the experts, each device
computes only its own experts, on the token copies a ragged all-to-all brings it
(`experts_parallel`).

Every backend takes expert ids in [0, E] for weights of E experts: id E marks a row routed to no
expert (padding). Such rows are sorted after the others and left out of the group sizes, so they
cost no matmul; their output (and the gradient through them) is zero. Each backend's core takes
rows already grouped by expert (`grouped_by_platform`): expert parallelism receives its rows
grouped that way and runs the core alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import Mesh, PartitionSpec

from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.mlp import ACTIVATIONS, GatedMLP
from qwenvl_jax.sharding import current_mesh, logical_to_spec, map_shards, normal, param, use_mesh

EXPERT_AXES = (
    "experts",
    "expert_embed",
    "expert_mlp",
)  # gate_up_proj; down_proj swaps the last two


class SparseMoE(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        act: str = "silu",
        shared_hidden: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.top_k = top_k
        self.num_experts = num_experts
        self.act = act
        self.dtype = dtype
        self.gate = Linear(
            dim,
            num_experts,
            axes=("embed", "router"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        # x @ W layout: gate_up float[E, D, 2I] (first I columns gate, last I up),
        # down float[E, I, D]
        self.gate_up_proj = param(
            rngs,
            normal(),
            (num_experts, dim, 2 * hidden),
            param_dtype,
            EXPERT_AXES,
        )
        self.down_proj = param(
            rngs,
            normal(),
            (num_experts, hidden, dim),
            param_dtype,
            (EXPERT_AXES[0], EXPERT_AXES[2], EXPERT_AXES[1]),
        )
        if shared_hidden:
            kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.shared_expert = GatedMLP(dim, shared_hidden, act=act, **kw)
            self.shared_expert_gate = Linear(dim, 1, axes=("embed", None), **kw)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: float[B, T, D] -> (float[B, T, D], router logits float[B*T, E])."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D).astype(self.dtype)
        logits = self.gate(flat)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)  # [N, k]
        weights = (weights / jnp.sum(weights, axis=-1, keepdims=True)).astype(logits.dtype)
        w_gate_up = self.gate_up_proj[...].astype(self.dtype)
        w_down = self.down_proj[...].astype(self.dtype)
        if splits_experts(current_mesh(), self.num_experts):
            out = experts_parallel(flat, experts, weights, w_gate_up, w_down, act=self.act)
        else:
            y = experts_by_platform(flat, experts, w_gate_up, w_down, act=self.act)
            out = jnp.sum(y * weights[..., None], axis=1)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        return out.reshape(B, T, D), logits


def experts_by_platform(
    x: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """The experts by the backend of the platform compiled for -> float[N, k, D], the output of
    expert experts[n, j] on token n."""
    args = (x, experts, w_gate_up, w_down)
    return _by_platform(args, act, cpu=experts_tiled, tpu=experts_gmm, default=experts_ragged)


def grouped_by_platform(
    rows: jax.Array, group_sizes: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """Rows already grouped by expert through their experts, by the backend of the platform
    compiled for: rows float[M, D], the first group_sizes[0] for expert 0, the next for expert
    1, ..., the rows after them of no expert -> float[M, D] (zero after the groups)."""
    args = (rows, group_sizes, w_gate_up, w_down)
    return _by_platform(args, act, cpu=grouped_tiled, tpu=grouped_gmm, default=grouped_ragged)


def _by_platform(args: tuple, act: str, **backends: Callable) -> jax.Array:
    """`jax.lax.platform_dependent` over the backends (cpu, tpu, default), each given `act`."""
    chosen = {name: functools.partial(f, act=act) for name, f in backends.items()}
    return jax.lax.platform_dependent(*args, **chosen)


def splits_experts(mesh: Mesh | None, num_experts: int) -> bool:
    """Whether `mesh` splits the experts over its `expert` axis (size > 1, dividing them)."""
    if mesh is None or mesh.shape.get("expert", 1) == 1:
        return False
    return logical_to_spec(EXPERT_AXES[:1], (num_experts,), mesh)[0] == "expert"


def experts_parallel(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str,
    experts_fn: Callable | None = None,
) -> jax.Array:
    """The experts' weighted sum per token, each device computing only its own experts: expert
    parallelism over the active mesh's `expert` axis (`splits_experts` must hold).

    x: float[N, D]; experts, weights: [N, k] (the top-k ids and their weights); w_gate_up:
    float[E, D, 2I]; w_down: float[E, I, D] -> float[N, D].

    One shard_map over the mesh: the tokens split as the batch (over `expert` too), the weights
    as stored (experts over `expert`). A device all-gathers its E/ep experts' weights over the
    other mesh axes of their feature dimensions (fsdp, and tensor: the experts' hidden dimension
    is gathered whole rather than split, so the tensor devices repeat the same work, as on the
    unsplit path). It sorts its own tokens' k copies by expert, which groups them by the device
    holding that expert, and ragged all-to-alls over `expert` send each device exactly the
    copies routed to its experts (dispatch), each expert's rows from every device landing in
    that expert's region of the receive buffer (one update per device and local expert), so the
    rows arrive grouped by expert and are not sorted again; the device runs the grouped backend
    (`experts_fn(rows, group_sizes, w_gate_up, w_down, act=act)`, by default the platform's:
    tiled, gmm or ragged_dot) on them, and ragged all-to-alls send every output row back to the
    device of its token (combine), which sums each token's weighted outputs. No device holds
    more than E/ep experts' weights or computes another device's copies, the result is the
    unsplit computation's, and nothing is dropped. The exchange runs in rounds (`_routed`): a
    device receives a window of `round_rows` rows a round (its own tokens' copies, what balanced
    routing sends it, plus headroom), and the rounds repeat until the fullest device has
    received all its rows, so buffers and work scale with the routing rather than with the worst
    case (every copy of the expert group routed to one device's experts). The gradient runs the
    same rounds; the weights' gradients are reduce-scattered over fsdp/tensor. Token counts the
    batch split does not divide are padded with rows routed to no expert.

    The ragged all-to-all is XLA's on TPU and GPU; XLA:CPU has none, so on CPU devices the same
    exchange is an all-to-all of fixed-size blocks (`_ragged_all_to_all`).
    """
    mesh = current_mesh()
    assert splits_experts(mesh, w_gate_up.shape[0]), "experts_parallel needs an expert mesh axis"
    run = functools.partial(experts_fn or grouped_by_platform, act=act)
    N, k = experts.shape
    E = w_gate_up.shape[0]
    ep = mesh.shape["expert"]
    here = E // ep
    (batch,) = logical_to_spec(("batch",), mesh=mesh)
    token_axes = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
    if "expert" not in token_axes:
        token_axes = (*token_axes, "expert")
    split = int(np.prod([mesh.shape[a] for a in token_axes]))
    pad = -N % split
    if pad:  # rows of weight zero, routed to no expert
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=E)
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    n = (N + pad) // split
    # the most copies one device sends another: each token's k experts are distinct
    block = n * min(k, here)
    rows = round_rows(n, k, ep * block)
    gate_up_spec = logical_to_spec(EXPERT_AXES, w_gate_up.shape, mesh)
    down_axes = (EXPERT_AXES[0], EXPERT_AXES[2], EXPERT_AXES[1])
    down_spec = logical_to_spec(down_axes, w_down.shape, mesh)
    tokens = PartitionSpec(token_axes, None)

    def gather_features(w, spec):  # the local experts' weights whole
        for dim in (1, 2):
            if spec[dim] is not None:
                w = jax.lax.all_gather(w, spec[dim], axis=dim, tiled=True)
        return w

    def per_device(*args):  # no nested split of the backend (also when differentiated)
        with use_mesh(None):
            return run(*args)

    def local(x, experts, weights, w_gate_up, w_down):
        w_gate_up = gather_features(w_gate_up, gate_up_spec)
        w_down = gather_features(w_down, down_spec)
        # the copies sorted by expert: grouped by destination device; id E (none) last, unsent
        copies, perm, counts = _by_expert(x, experts, E)
        scales = _take_rows(weights.reshape(-1, 1), *perm)  # each sorted copy's routing weight
        rounds = _Rounds.of(counts.reshape(ep, here), rows, block, mesh.axis_names)
        out = _routed(per_device, rounds, copies, scales, w_gate_up, w_down)
        return jnp.sum(_unsort(out, perm, experts), axis=1)

    out = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, gate_up_spec, down_spec),
        out_specs=tokens,
        check_vma=False,
    )(x, experts, weights, w_gate_up, w_down)
    return out[:N]


# A device's expected share of the token copies under balanced routing is its own n tokens' k
# copies. Expert parallelism exchanges and computes the copies in rounds of that share plus
# headroom, as many rounds as the busiest device of the mesh needs, so that the exchange buffers
# and the work around the expert kernels scale with the rows routed, not with the worst case a
# dropless exchange must admit (ep times the share, when a device holds k experts or more).
ROUND_HEADROOM = 1.25


def round_rows(n: int, k: int, worst: int) -> int:
    """The rows a device receives in one round: its n tokens' k copies plus headroom, a
    multiple of 8, at most `worst` (the most rows it can be sent in all)."""
    return min(-(-math.ceil(ROUND_HEADROOM * n * k) // 8) * 8, worst)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["send", "send_off", "land", "recv", "recv_off", "back", "starts", "trips"],
    meta_fields=["rows", "block"],
)
@dataclasses.dataclass(frozen=True)
class _Rounds:
    """The exchanges of `experts_parallel` on one device, inside the shard_map over `expert` (ep
    devices, E/ep experts each): one update per device and local expert, int32[ep * E/ep]
    (device-major, as XLA's ragged all-to-all takes several updates per device), but `starts`
    and `trips`.

    Over all rounds, as if in one exchange: send: rows to each device's expert, from send_off in
    the sorted copies; land: where they land in that device's (virtual, whole) receive buffer;
    recv: rows from each device for each local expert, at recv_off in the buffer; back: where
    the rows returned to each device land in its copies (its send_off of this device's expert).
    The receive buffer holds expert e's rows (from every device, in device order) in
    [starts[e], starts[e + 1]), so it is grouped by expert as it lands. Round t moves the rows
    of window [t * rows, (t + 1) * rows) of every receive buffer; `trips` rounds cover the
    fullest buffer.
    """

    send: jax.Array
    send_off: jax.Array
    land: jax.Array
    recv: jax.Array
    recv_off: jax.Array
    back: jax.Array
    starts: jax.Array  # int32[E/ep + 1]: each local expert's region of the receive buffer
    trips: jax.Array  # int32[]: the same on every device of the mesh
    rows: int  # rows a device receives in a round
    block: int  # the most rows one device sends another in a round

    @classmethod
    def of(cls, counts: jax.Array, rows: int, block: int, axes: tuple[str, ...]) -> _Rounds:
        """counts: int32[ep, E/ep], this device's copies routed to each device's experts."""

        def exchanged(a):  # row d goes to device d; row s of the result came from device s
            return jax.lax.all_to_all(a, "expert", 0, 0, tiled=True)

        send_off = (jnp.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(counts.shape)
        recv = exchanged(counts)  # [source device, local expert]
        per_expert = jnp.sum(recv, axis=0)
        region = jnp.cumsum(per_expert) - per_expert
        recv_off = region + jnp.cumsum(recv, axis=0) - recv  # sources in order within a region
        land, back = exchanged(recv_off), exchanged(send_off)
        total = jnp.sum(per_expert)
        # every device loops as often as the fullest buffer needs (one loop, uniform collectives)
        trips = jax.lax.pmax((total + rows - 1) // rows, axes)
        flat = [a.reshape(-1) for a in (counts, send_off, land, recv, recv_off, back)]
        starts = jnp.append(region, total)
        return cls(*flat, starts, trips, rows, min(block, rows))

    def window(self, t: jax.Array) -> tuple[tuple, tuple]:
        """Round t's dispatch and combine: (send_off, send, land, recv) of each exchange."""
        start, end = t * self.rows, (t + 1) * self.rows
        lo = jnp.clip(self.land, start, end)  # this device's rows in each device's window
        send = jnp.clip(self.land + self.send, start, end) - lo
        send_off, land = self.send_off + lo - self.land, lo - start
        lo = jnp.clip(self.recv_off, start, end)  # each device's rows in this device's window
        recv = jnp.clip(self.recv_off + self.recv, start, end) - lo
        recv_off, back = lo - start, self.back + lo - self.recv_off
        return (send_off, send, land, recv), (recv_off, recv, back, send)

    def groups(self, t: jax.Array) -> jax.Array:
        """int32[E/ep]: the rows of each local expert in round t's window, which holds them in
        that order from its first row (zero rows after them)."""
        bounds = jnp.clip(self.starts, t * self.rows, (t + 1) * self.rows)
        return bounds[1:] - bounds[:-1]

    def dispatch(self, t: jax.Array, copies: jax.Array) -> jax.Array:
        """Round t's rows of the devices' copies routed here: float[rows, D], zero after them."""
        out = jnp.zeros((self.rows, copies.shape[1]), copies.dtype)
        return _ragged_all_to_all(copies, out, *self.window(t)[0], block=self.block)

    def combine(self, t: jax.Array, rows: jax.Array, out: jax.Array) -> jax.Array:
        """`out` (this device's copies) with round t's rows, computed elsewhere, put back."""
        rows = rows.astype(out.dtype)
        return _ragged_all_to_all(rows, out, *self.window(t)[1], block=self.block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _routed(run, rounds, copies, scales, w_gate_up, w_down):
    """Each copy through its expert, on the device that holds the expert, times its routing
    weight (scales float[M, 1]): for each round, the window's rows and scales dispatched, the
    grouped backend run on the rows (`run(rows, group_sizes, w_gate_up, w_down)`: rows are
    independent, so computing them a window at a time is computing them at once) and the scaled
    outputs combined back into this device's copies (zero where no expert).

    The gradient loops over the same rounds: it dispatches the rows, their scales and their
    output cotangents, recomputes the window's forward for its VJP and for the scales'
    gradients, combines both gradients back and sums the weights' gradients over the rounds in
    float32. Nothing in the gradient reads the forward's output, so a rematerialized step does
    not run the forward's rounds again for the backward."""
    return _routed_fwd(run, rounds, copies, scales, w_gate_up, w_down)[0]


def _routed_fwd(run, rounds, copies, scales, w_gate_up, w_down):
    def body(t, out):
        y = run(rounds.dispatch(t, copies), rounds.groups(t), w_gate_up, w_down)
        return rounds.combine(t, y * rounds.dispatch(t, scales), out)

    out = jax.lax.fori_loop(0, rounds.trips, body, jnp.zeros_like(copies))
    return out, (rounds, copies, scales, w_gate_up, w_down)


def _routed_bwd(run, res, g):
    rounds, copies, scales, w_gate_up, w_down = res

    def body(t, carry):
        d_copies, d_scales, d_gate_up, d_down = carry
        groups = rounds.groups(t)
        received, g_received = rounds.dispatch(t, copies), rounds.dispatch(t, g)
        y, vjp = jax.vjp(lambda r, a, b: run(r, groups, a, b), received, w_gate_up, w_down)
        d_rows, d_a, d_b = vjp(g_received * rounds.dispatch(t, scales))
        d_copies = rounds.combine(t, d_rows, d_copies)
        d_scales = rounds.combine(t, jnp.sum(g_received * y, axis=1, keepdims=True), d_scales)
        d_gate_up = d_gate_up + d_a.astype(jnp.float32)
        return d_copies, d_scales, d_gate_up, d_down + d_b.astype(jnp.float32)

    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    init = (jnp.zeros_like(copies), jnp.zeros_like(scales), f32(w_gate_up.shape), f32(w_down.shape))
    d_copies, d_scales, d_gate_up, d_down = jax.lax.fori_loop(0, rounds.trips, body, init)
    d_gate_up, d_down = d_gate_up.astype(w_gate_up.dtype), d_down.astype(w_down.dtype)
    return None, d_copies, d_scales, d_gate_up, d_down


_routed.defvjp(_routed_fwd, _routed_bwd)


def _ragged_all_to_all(rows, out, send_off, send, land, recv, *, block):
    """XLA's ragged all-to-all over `expert` of `rows` into `out` (TPU, GPU), with U updates per
    device (the int32[ep * U] arguments, device-major); on CPU, where XLA has none, an
    all-to-all of [block, D] blocks placed by row: a device's updates to another are sent one
    after the other in one block (block bounds their sum)."""

    def native(rows, out, send_off, send, land, recv):
        # rows as [M, D / 128, 128]: the exchange needs each row contiguous, which libtpu gets
        # from whole (sublane, 128) tiles here, and from a narrow (2, 128) tiling of [M, D]
        lanes = (-1, 128) if rows.shape[1] % 128 == 0 else (rows.shape[1],)
        rows, out_rows = rows.reshape(rows.shape[0], *lanes), out.reshape(out.shape[0], *lanes)
        args = (send_off, send, land, recv)
        got = jax.lax.ragged_all_to_all(rows, out_rows, *args, axis_name="expert")
        return got.reshape(out.shape)

    def blocks(rows, out, send_off, send, land, recv):
        ep = jax.lax.axis_size("expert")
        j = jnp.arange(block, dtype=jnp.int32)

        def rows_of(offsets, sizes, past):  # row j of each device's block: its update's row
            sizes, offsets = sizes.reshape(ep, -1), offsets.reshape(ep, -1)
            ends = jnp.cumsum(sizes, axis=1)
            u = jnp.sum(j[None, :, None] >= ends[:, None, :], axis=2)  # [ep, block]
            at = jnp.minimum(u, sizes.shape[1] - 1)
            first = jnp.take_along_axis(offsets - (ends - sizes), at, axis=1)
            return jnp.where(u < sizes.shape[1], first + j, past)

        src = rows_of(send_off, send, rows.shape[0])
        sent = jnp.take(rows, src, axis=0, mode="fill", fill_value=0)
        got = jax.lax.all_to_all(sent, "expert", 0, 0, tiled=True)  # [ep, block, D]
        at = jax.lax.all_to_all(land.reshape(ep, -1), "expert", 0, 0, tiled=True)
        dest = rows_of(at, recv, out.shape[0]).reshape(-1)  # where each source's rows go
        return out.at[dest].set(got.reshape(-1, rows.shape[1]), mode="drop")

    args = (rows, out, send_off, send, land, recv)
    return jax.lax.platform_dependent(*args, cpu=blocks, default=native)


def _by_expert(
    x: jax.Array, experts: jax.Array, num_experts: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The token copies sorted by expert: (copies float[N*k, D], (order, inverse) (copy i of the
    sorted rows is flat copy order[i], i.e. token order[i] // k; inverse undoes order),
    group_sizes int32[E]). Copies of id E (no expert here) come last, counted in no group.

    The copies are the tokens repeated k times and permuted: the gradient sums each token's k
    copies and permutes back, with no scatter (a TPU scatter-add of [N*k, D] rows builds an
    index per element)."""
    N, k = experts.shape
    flat_experts = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_experts, stable=True)
    inverse = jnp.argsort(order)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    copies = jnp.broadcast_to(x[:, None], (N, k, x.shape[-1])).reshape(N * k, -1)
    return _take_rows(copies, order, inverse), (order, inverse), group_sizes


def _unsort(y: jax.Array, perm: tuple[jax.Array, jax.Array], experts: jax.Array) -> jax.Array:
    """float[N*k, D] rows sorted by expert -> float[N, k, D] in routing order."""
    order, inverse = perm
    return _take_rows(y, inverse, order).reshape(*experts.shape, -1)


def experts_ragged(
    x: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """The experts as `jax.lax.ragged_dot` over the token copies sorted by expert.

    x: float[N, D]; experts: int[N, k]; w_gate_up: float[E, D, 2I]; w_down: float[E, I, D]
    -> float[N, k, D], the output of expert experts[n, j] on token n.
    """
    tokens, perm, group_sizes = _by_expert(x, experts, w_gate_up.shape[0])
    return _unsort(grouped_ragged(tokens, group_sizes, w_gate_up, w_down, act=act), perm, experts)


def grouped_ragged(
    rows: jax.Array, group_sizes: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """Rows grouped by expert (`grouped_by_platform`) through `jax.lax.ragged_dot`."""
    h = jax.lax.ragged_dot(rows, w_gate_up, group_sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.lax.ragged_dot(ACTIVATIONS[act](gate) * up, w_down, group_sizes)


GMM_ROWS = 512  # row tile: a chip re-reads each expert's weights once per tile of its rows


def _gmm_block(size: int) -> int | None:
    """The block of a feature dimension: a multiple of the 128 lanes that divides it, else the
    whole dimension while small (a block must be one or the other); None for a large dimension
    of neither kind, whose whole-dimension blocks could overflow the kernel's VMEM buffers."""
    for block in (512, 256, 128):
        if size % block == 0:
            return block
    return size if size <= 512 else None


@dataclasses.dataclass(frozen=True)
class _GmmTiling:
    """megablox tiling (tm, tk, tn) for an (m, k, n) product. A function of the shape because the
    kernel's backward reuses the tiling for the transposed products (k and n swapped)."""

    rows: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        return self.rows, _gmm_block(k), _gmm_block(n)


def experts_gmm(
    x: jax.Array,
    experts: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str,
    interpret: bool = False,
) -> jax.Array:
    """The experts as megablox grouped matmuls (`gmm`, TPU Pallas kernels; the gradients through
    its custom VJP: `gmm` for the inputs, `tgmm` for the expert weights): the same result as
    `experts_ragged`. `interpret` runs the kernels in Pallas interpret mode (any backend).

    Under a mesh each device runs the kernels on its own tokens (split as the batch) with every
    expert's weights whole (gathered, as a dense layer's are under FSDP; their gradient summed
    over the devices), unless the mesh splits the experts (`experts_parallel`). Feature sizes
    the kernel cannot tile, or dtypes it does not take, use `experts_ragged`.
    """
    D, I2 = w_gate_up.shape[1:]
    fits = all(_gmm_block(size) is not None for size in (D, I2, I2 // 2))
    if not fits or x.dtype not in (jnp.float32, jnp.bfloat16):
        return experts_ragged(x, experts, w_gate_up, w_down, act=act)
    run = map_shards(
        functools.partial(_experts_gmm, act=act, interpret=interpret),
        in_axes=(("batch", None), ("batch", None), (None, None, None), (None, None, None)),
        out_axes=("batch", None, None),
    )
    return run(x, experts, w_gate_up, w_down)


def _experts_gmm(x, experts, w_gate_up, w_down, *, act, interpret):
    """`experts_gmm` on one device: the copies sorted by expert through `grouped_gmm`."""
    tokens, perm, group_sizes = _by_expert(x, experts, w_gate_up.shape[0])
    y = grouped_gmm(tokens, group_sizes, w_gate_up, w_down, act=act, interpret=interpret)
    return _unsort(y, perm, experts)


def grouped_gmm(
    rows: jax.Array,
    group_sizes: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str,
    interpret: bool = False,
) -> jax.Array:
    """Rows grouped by expert (`grouped_by_platform`) through the megablox kernels on one device
    (`grouped_ragged` for shapes or dtypes the kernels do not take). The kernel takes a row
    count that its row tile divides: the rows are padded with zero rows. The rows of no expert
    and the padding form one more group, after the E of the weights: the kernels visit only the
    row tiles of the weights' groups and write zeros to the rest (the output, and the rows'
    gradient)."""
    D, I2 = w_gate_up.shape[1:]
    fits = all(_gmm_block(size) is not None for size in (D, I2, I2 // 2))
    if not fits or rows.dtype not in (jnp.float32, jnp.bfloat16):
        return grouped_ragged(rows, group_sizes, w_gate_up, w_down, act=act)
    M = rows.shape[0]
    # a few copies (decoding) take one tile of their own size, in whole bf16 sublane tiles (16)
    tile = min(GMM_ROWS, -(-M // 16) * 16)
    padded = -(-M // tile) * tile
    rows = jnp.pad(rows, ((0, padded - M), (0, 0)))
    group_sizes = jnp.append(group_sizes, padded - jnp.sum(group_sizes))
    tiling = _GmmTiling(tile)

    def gmm(lhs, rhs):  # positional: the custom VJP's static arguments are by position
        return megablox.gmm(lhs, rhs, group_sizes, rows.dtype, tiling, None, None, False, interpret)

    h = gmm(rows, w_gate_up)
    gate, up = jnp.split(h, 2, axis=-1)
    return gmm(ACTIVATIONS[act](gate) * up, w_down)[:M]


def experts_tiled(
    x: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """The experts as a loop of tile-by-expert matmuls: the same result as `experts_ragged`.

    On CPU, XLA expands `ragged_dot` into a dense product with every expert (E times the FLOPs).
    Here each expert's token copies start at a multiple of the tile height, so every tile of rows
    belongs to one expert and the loop multiplies each used tile by its expert's weights only:
    the FLOPs of the routed tokens plus at most one partial tile per expert.
    """
    N, k = experts.shape
    E = w_gate_up.shape[0]
    # small batches (decoding) get small tiles: about one tile per expert
    tile = min(128, max(8, 1 << (-(-N * k // E) - 1).bit_length()))
    dest, src, tile_expert, used = _tile_layout(experts.reshape(-1), E, tile)
    copies = jnp.repeat(x, k, axis=0)  # [N*k, D], copy j of token n at row n*k + j
    h = _grouped_matmul(_take_rows(copies, src, dest), w_gate_up, tile_expert, used, tile)
    gate, up = jnp.split(h, 2, axis=-1)
    y = _grouped_matmul(ACTIVATIONS[act](gate) * up, w_down, tile_expert, used, tile)
    return _take_rows(y, dest, src).reshape(N, k, -1)


def grouped_tiled(
    rows: jax.Array, group_sizes: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """Rows grouped by expert (`grouped_by_platform`) through `experts_tiled` (CPU)."""
    ends = jnp.cumsum(group_sizes)
    index = jnp.arange(rows.shape[0], dtype=ends.dtype)
    ids = jnp.sum(index[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)  # E after the groups
    return experts_tiled(rows, ids[:, None], w_gate_up, w_down, act=act)[:, 0]


def _tile_layout(
    flat_experts: jax.Array, num_experts: int, tile: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Rows of the tiled layout for the token copies routed to `flat_experts` int[M].

    Returns dest int[M] (each copy's row; R, past the end, for a copy of id E: no row),
    src int[R] (each row's copy, M for a padding row), tile_expert int[R / tile] (the expert of
    each tile) and used int[] (tiles holding copies); R = (ceil(M / tile) + E) * tile bounds the
    rows whatever the routing.
    """
    M = flat_experts.shape[0]
    tiles = -(-M // tile) + num_experts
    R = tiles * tile
    counts = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    expert_tiles = (counts + tile - 1) // tile
    tiles_end = jnp.cumsum(expert_tiles)
    row_start = (tiles_end - expert_tiles) * tile  # first row of each expert
    copy_start = jnp.cumsum(counts) - counts  # first copy of each expert in sorted order
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = jnp.minimum(flat_experts[order], num_experts - 1)
    rank = jnp.arange(M, dtype=jnp.int32) - copy_start[sorted_experts]
    row = jnp.where(flat_experts[order] < num_experts, row_start[sorted_experts] + rank, R)
    dest = jnp.zeros(M, jnp.int32).at[order].set(row)
    src = jnp.full(R, M, jnp.int32).at[dest].set(jnp.arange(M, dtype=jnp.int32), mode="drop")
    tile_expert = jnp.searchsorted(tiles_end, jnp.arange(tiles), side="right")
    tile_expert = jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32)
    return dest, src, tile_expert, tiles_end[-1]


@jax.custom_vjp
def _take_rows(a: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """a[index], an index of len(a) reading a row of zeros.

    `inverse` maps each row of `a` to its row of the result (a one-to-one row map, e.g. the
    inverse of a permutation), so the gradient is a gather too (the gradient of a gather would
    otherwise be a scatter-add, which on TPU builds an index per element).
    """
    return _rows(a, index)


def _rows(a: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(a, index, inverse):
    return _rows(a, index), (index, inverse)


def _take_rows_bwd(res, g):
    index, inverse = res
    return _rows(g, inverse), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _expert_runs(tile_expert: jax.Array, used: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The runs of consecutive tiles of one expert among the first `used` tiles: (first tile of
    each run int[T + 1], ending with `used`; number of runs int[])."""
    T = tile_expert.shape[0]
    t = jnp.arange(T)
    starts = (t < used) & ((t == 0) | (tile_expert != jnp.roll(tile_expert, 1)))
    first = jnp.nonzero(starts, size=T, fill_value=T)[0]
    first = jnp.minimum(jnp.append(first, T), used)  # run r spans tiles first[r]:first[r + 1]
    return first.astype(jnp.int32), jnp.sum(starts, dtype=jnp.int32)


def _over_experts(tile_expert, used, carry, expert_fn):
    """carry = expert_fn(carry, e, first tile, end tile) for each expert that owns tiles: a loop
    over experts, each slicing its weights once and looping over its own tiles inside (XLA:CPU
    copies a dynamic slice of a stacked weight before a dot: once per expert, not per tile)."""
    first, runs = _expert_runs(tile_expert, used)

    def body(r, carry):
        return expert_fn(carry, tile_expert[first[r]], first[r], first[r + 1])

    return jax.lax.fori_loop(0, runs, body, carry)


def _tile_loop(x, w, tile_expert, used, tile):
    def expert(out, e, t0, t1):
        we = w[e]

        def one_tile(t, out):
            y = jnp.dot(jax.lax.dynamic_slice_in_dim(x, t * tile, tile), we).astype(out.dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, y, t * tile, 0)

        return jax.lax.fori_loop(t0, t1, one_tile, out)

    out = jnp.zeros((x.shape[0], w.shape[-1]), x.dtype)
    return _over_experts(tile_expert, used, out, expert)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_matmul(
    x: jax.Array, w: jax.Array, tile_expert: jax.Array, used: jax.Array, tile: int
) -> jax.Array:
    """x float[R, K] (tiles of `tile` rows), w float[E, K, M] -> float[R, M]: each of the first
    `used` tiles times the weights of its expert, the rows after them zero."""
    return _tile_loop(x, w, tile_expert, used, tile)


def _grouped_matmul_fwd(x, w, tile_expert, used, tile):
    return _tile_loop(x, w, tile_expert, used, tile), (x, w, tile_expert, used)


def _grouped_matmul_bwd(tile, res, g):
    x, w, tile_expert, used = res

    def expert(carry, e, t0, t1):
        dx, dw = carry
        w_t = w[e].T

        def one_tile(t, inner):
            dx, dw_e = inner
            rows = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)
            g_rows = jax.lax.dynamic_slice_in_dim(g, t * tile, tile)
            dx_rows = jnp.dot(g_rows, w_t).astype(dx.dtype)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_rows, t * tile, 0)
            return dx, dw_e + jnp.dot(rows.T, g_rows, preferred_element_type=jnp.float32)

        dw_e = jnp.zeros(w.shape[1:], jnp.float32)
        dx, dw_e = jax.lax.fori_loop(t0, t1, one_tile, (dx, dw_e))
        return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_e.astype(dw.dtype), e, 0)

    init = (jnp.zeros_like(x), jnp.zeros(w.shape, w.dtype))
    dx, dw = _over_experts(tile_expert, used, init, expert)
    return dx, dw, None, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def load_balancing_loss(
    router_logits: jax.Array, top_k: int, valid: jax.Array | None = None
) -> jax.Array:
    """Switch-style auxiliary loss: E * sum_e (fraction of tokens routed to e) * (mean prob of e).

    router_logits: float[L, N, E] over the MoE layers; valid: bool[N] marks real (non-pad) tokens.
    """
    E = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, sel = jax.lax.top_k(probs, top_k)
    mask = jax.nn.one_hot(sel, E, dtype=jnp.float32)  # [L, N, k, E]
    w = jnp.ones(probs.shape[1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0) * probs.shape[0]
    tokens_per_expert = jnp.einsum("lnke,n->ke", mask, w) / denom
    prob_per_expert = jnp.einsum("lne,n->e", probs, w) / denom
    return jnp.sum(tokens_per_expert * prob_per_expert[None]) * E
