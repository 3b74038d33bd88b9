"""Sparse mixture of experts (Qwen3-VL-MoE, Qwen3.5-MoE): float32 router softmax, top-k,
renormalised, optionally plus a shared SwiGLU expert scaled per token by a sigmoid gate (Qwen3.5).
The routed experts are computed as grouped matmuls over the token copies sorted by expert,
dropless: on CPU a loop of tile-by-expert matmuls (`experts_tiled`), on TPU the megablox
grouped-matmul kernels (`experts_gmm`), elsewhere `jax.lax.ragged_dot` (`experts_ragged`), chosen
by the platform the step is compiled for (so an ahead-of-time compile for a TPU topology from a
CPU host gets the kernels)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from qwenvl_jax.layers.linear import Linear
from qwenvl_jax.layers.mlp import ACTIVATIONS, GatedMLP
from qwenvl_jax.sharding import map_shards, normal, param


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
            ("experts", "expert_embed", "expert_mlp"),
        )
        self.down_proj = param(
            rngs,
            normal(),
            (num_experts, hidden, dim),
            param_dtype,
            ("experts", "expert_mlp", "expert_embed"),
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
        y = jax.lax.platform_dependent(
            flat,
            experts,
            w_gate_up,
            w_down,
            cpu=functools.partial(experts_tiled, act=self.act),
            tpu=functools.partial(experts_gmm, act=self.act),
            default=functools.partial(experts_ragged, act=self.act),
        )  # [N, k, D]: each token's output from each of its experts
        out = jnp.sum(y * weights[..., None], axis=1)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        return out.reshape(B, T, D), logits


def _by_expert(
    x: jax.Array, experts: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The token copies sorted by expert: (copies float[N*k, D], order int[N*k] (copy i of the
    sorted rows is flat copy order[i], i.e. token order[i] // k), group_sizes int32[E])."""
    k = experts.shape[1]
    flat_experts = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    return x[order // k], order, group_sizes


def _unsort(y: jax.Array, order: jax.Array, experts: jax.Array) -> jax.Array:
    """float[N*k, D] rows sorted by expert -> float[N, k, D] in routing order."""
    return jnp.zeros_like(y).at[order].set(y).reshape(*experts.shape, -1)


def experts_ragged(
    x: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, act: str
) -> jax.Array:
    """The experts as `jax.lax.ragged_dot` over the token copies sorted by expert.

    x: float[N, D]; experts: int[N, k]; w_gate_up: float[E, D, 2I]; w_down: float[E, I, D]
    -> float[N, k, D], the output of expert experts[n, j] on token n.
    """
    tokens, order, group_sizes = _by_expert(x, experts, w_gate_up.shape[0])
    h = jax.lax.ragged_dot(tokens, w_gate_up, group_sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    h = ACTIVATIONS[act](gate) * up
    y = jax.lax.ragged_dot(h, w_down, group_sizes)
    return _unsort(y, order, experts)


GMM_ROWS = 128  # megablox's default row tile (rows of one group at a time)


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
    over the devices). Feature sizes the kernel cannot tile, or dtypes it does not take, use
    `experts_ragged`.
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
    """`experts_gmm` on one device. The kernel takes a row count that its row tile divides: the
    sorted copies are padded with zero rows counted into the last expert's group, which adds
    exact zeros to its weight gradient (and a zero row's output is dropped)."""
    N, k = experts.shape
    M = N * k
    # a few copies (decoding) take one tile of their own size, in whole bf16 sublane tiles (16)
    rows = min(GMM_ROWS, -(-M // 16) * 16)
    padded = -(-M // rows) * rows
    tokens, order, group_sizes = _by_expert(x, experts, w_gate_up.shape[0])
    tokens = jnp.pad(tokens, ((0, padded - M), (0, 0)))
    group_sizes = group_sizes.at[-1].add(padded - M)
    tiling = _GmmTiling(rows)

    def gmm(lhs, rhs):  # positional: the custom VJP's static arguments are by position
        return megablox.gmm(lhs, rhs, group_sizes, x.dtype, tiling, None, None, False, interpret)

    h = gmm(tokens, w_gate_up)
    gate, up = jnp.split(h, 2, axis=-1)
    y = gmm(ACTIVATIONS[act](gate) * up, w_down)
    return _unsort(y[:M], order, experts)


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


def _tile_layout(
    flat_experts: jax.Array, num_experts: int, tile: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Rows of the tiled layout for the token copies routed to `flat_experts` int[M].

    Returns dest int[M] (each copy's row), src int[R] (each row's copy, M for a padding row),
    tile_expert int[R / tile] (the expert of each tile) and used int[] (tiles holding copies);
    R = (ceil(M / tile) + E) * tile bounds the rows whatever the routing.
    """
    M = flat_experts.shape[0]
    tiles = -(-M // tile) + num_experts
    counts = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    expert_tiles = (counts + tile - 1) // tile
    tiles_end = jnp.cumsum(expert_tiles)
    row_start = (tiles_end - expert_tiles) * tile  # first row of each expert
    copy_start = jnp.cumsum(counts) - counts  # first copy of each expert in sorted order
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    rank = jnp.arange(M, dtype=jnp.int32) - copy_start[sorted_experts]
    dest = jnp.zeros(M, jnp.int32).at[order].set(row_start[sorted_experts] + rank)
    src = jnp.full(tiles * tile, M, jnp.int32).at[dest].set(jnp.arange(M, dtype=jnp.int32))
    tile_expert = jnp.searchsorted(tiles_end, jnp.arange(tiles), side="right")
    tile_expert = jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32)
    return dest, src, tile_expert, tiles_end[-1]


@jax.custom_vjp
def _take_rows(a: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """a_ext[index], a_ext being `a` with a row of zeros appended (index len(a) reads zeros).

    `inverse` maps each row of `a` to its row of the result (a one-to-one row map), so the
    gradient is a gather too (the gradient of a gather would otherwise be a scatter-add).
    """
    return jnp.concatenate([a, jnp.zeros_like(a[:1])])[index]


def _take_rows_fwd(a, index, inverse):
    return _take_rows(a, index, inverse), (index, inverse)


def _take_rows_bwd(res, g):
    index, inverse = res
    return jnp.concatenate([g, jnp.zeros_like(g[:1])])[inverse], None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _tile_loop(x, w, tile_expert, used, tile):
    def body(t, out):
        rows = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)
        y = jnp.dot(rows, w[tile_expert[t]]).astype(out.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, y, t * tile, 0)

    return jax.lax.fori_loop(0, used, body, jnp.zeros((x.shape[0], w.shape[-1]), x.dtype))


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

    def body(t, carry):
        dx, dw = carry
        rows = jax.lax.dynamic_slice_in_dim(x, t * tile, tile)
        g_rows = jax.lax.dynamic_slice_in_dim(g, t * tile, tile)
        e = tile_expert[t]
        dx_rows = jnp.dot(g_rows, w[e].T).astype(dx.dtype)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_rows, t * tile, 0)
        dw_e = dw[e] + jnp.dot(rows.T, g_rows, preferred_element_type=jnp.float32)
        return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, 0)

    init = (jnp.zeros_like(x), jnp.zeros(w.shape, jnp.float32))
    dx, dw = jax.lax.fori_loop(0, used, body, init)
    return dx, dw.astype(w.dtype), None, None


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
