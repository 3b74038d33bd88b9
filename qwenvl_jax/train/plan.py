"""`qwenvl-jax plan`: the train step that `qwenvl-jax train` would run, compiled ahead of time for
a device topology without weights or data.

    report = plan(cfg, "v5p:2x2x2")

The step is the trainer's own (train/step.py `Trainer` over the model the training config builds,
with its freeze table, remat, layer scan and mesh); its inputs are abstract arrays with the
shardings the trainer gives them, the batch shaped by `batch_size`, `seq_len` and the data config's
vision budget. Topologies are TPU slices (`v5p:4x4x8`, `v5e:4x4`, ..., through libtpu: the `tpu`
extra) or `cpu:N` (N host devices).

The report holds per-chip memory (trainable parameters, optimizer state, frozen parameters, the
batch, temporaries, total) from the compiler's memory analysis and the arrays' shardings, the chip's
HBM and whether the step fits, the compile time, and the compiler's step-time estimate with the MFU
it implies. XLA's cost analysis counts the body of a while loop once, whatever its trip count (a
scanned decoder, the attention's loop over key blocks), so the estimate is scaled by the ratio of
the step's matmul FLOPs with and without trip counts, both read from the compiled HLO
(`hlo_matmul_flops`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from qwenvl_jax.config import ModelConfig, load_config
from qwenvl_jax.data.batch import V1_PIXELS, batch_spec
from qwenvl_jax.errors import ConfigError
from qwenvl_jax.layers.remat import unrolled_layer_scans
from qwenvl_jax.train.config import TrainConfig, resolve_model_path

GIB = 2**30

# Per chip: HBM bytes and peak dense bf16 FLOP/s (Google's published figures).
CHIPS = {
    "v4": {"hbm_bytes": 32 * GIB, "peak_flops": 275e12},
    "v5e": {"hbm_bytes": 16 * GIB, "peak_flops": 197e12},
    "v5p": {"hbm_bytes": int(95.74 * GIB), "peak_flops": 459e12},  # the limit libtpu states
    "v6e": {"hbm_bytes": 32 * GIB, "peak_flops": 918e12},
}
_TPU_NAMES = {"v5litepod": "v5e", "v6litepod": "v6e"}
LIBTPU_HINT = 'TPU topologies need libtpu: pip install "qwenvl_jax[tpu]"'


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: list
    chip: str
    hbm_bytes: float
    peak_flops: float


def topology(name: str) -> Topology:
    """The devices of `name`: `cpu:N` (N host devices of this process) or a TPU topology
    (`v5p:2x2x2`, abstract devices through libtpu)."""
    kind, _, shape = name.partition(":")
    if not shape:
        raise ConfigError(f"topology {name!r}: expected KIND:SHAPE, e.g. v5p:2x2x2 or cpu:8")
    if kind == "cpu":
        if not shape.isdigit() or int(shape) < 1:
            raise ConfigError(f"topology {name!r}: cpu:N takes a device count")
        n = int(shape)
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(
                f"topology {name}: this process has {len(devices)} CPU devices "
                f"(set XLA_FLAGS=--xla_force_host_platform_device_count={n})"
            )
        from qwenvl_jax.train.metrics import peak_flops

        hbm = _host_memory_bytes() / n
        return Topology(name, devices[:n], "cpu", hbm, peak_flops(devices[0]))
    chip = _TPU_NAMES.get(kind, kind)
    if chip not in CHIPS:
        raise ConfigError(f"topology {name!r}: unknown chip {kind!r} (known: cpu, {sorted(CHIPS)})")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise ConfigError(f"topology {name!r}: the shape must look like 2x2x2 or 4x4")
    # compiling needs no chip: let several planning processes load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(LIBTPU_HINT) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{kind}:{shape}")
    except Exception as e:  # libtpu's own message, one line
        raise ConfigError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
    return Topology(name, list(desc.devices), chip, **CHIPS[chip])


def _host_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


# ---------------------------------------------------------------------------------- the batch


def batch_shapes(
    cfg: TrainConfig, config: ModelConfig, vision_groups: int = 1
) -> dict[str, tuple[tuple, Any]]:
    """(shape, dtype) of each entry of a training batch of this run: the batch contract
    (data/batch.py) at `batch_size` x `seq_len`, with the data config's vision budget in
    `vision_groups` groups."""
    from qwenvl_jax.data.pipeline import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    known = {k: v for k, v in dict(cfg.data).items() if k in names}
    dc = DataConfig(
        **{**known, "train": known.get("train") or "-"},
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
    )
    if dc.max_patches is not None and dc.max_patches % (4 * vision_groups):
        raise ConfigError(
            f"data.max_patches must be a multiple of 4 x {vision_groups} (the data-parallel "
            f"shards), got {dc.max_patches}"
        )
    max_patches, max_images = dc.patch_budget(config, cfg.batch_size)
    return batch_spec(config, cfg.batch_size, cfg.seq_len, max_patches, max_images, vision_groups)


# ---------------------------------------------------------------------------------- the step


def build_trainer(cfg: TrainConfig, devices: list):
    """(trainer, model config, mesh) of `cfg` on `devices`, the model abstract (shapes and
    shardings only), configured with the run's remat and layer scan as `train` does."""
    from qwenvl_jax.modeling import build_model
    from qwenvl_jax.train import blocks
    from qwenvl_jax.train.loop import batch_shards, run_mesh
    from qwenvl_jax.train.step import Trainer

    if not cfg.model:
        raise ConfigError("model= is not set (a checkpoint folder or a preset name)")
    config = load_config(resolve_model_path(cfg.model))
    mesh = run_mesh(
        cfg.mesh, devices, batch_size=cfg.batch_size, num_experts=config.text.num_experts
    )
    batch_shards(mesh, cfg.batch_size)
    model = build_model(
        config, abstract=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh
    )
    blocks.configure(model, cfg.remat, cfg.scan_layers)
    return Trainer(model, cfg, mesh), config, mesh


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def full_batch_flops(config: ModelConfig, shapes: Mapping[str, tuple[tuple, Any]]) -> float:
    """Model FLOPs of one step (train/flops.py) on a batch whose every token slot is a real token
    (one sample a row) and whose vision budget is spent on images of 16 x 16 patches."""
    from qwenvl_jax.train.flops import step_flops

    B, L = shapes["input_ids"][0]
    host: dict[str, np.ndarray] = {"segment_ids": np.ones((B, L), np.int32)}
    if V1_PIXELS in shapes:
        host[V1_PIXELS] = np.zeros((shapes[V1_PIXELS][0][0], 1), np.float32)
    elif "vision.segment_ids" in shapes:
        n = math.prod(shapes["vision.segment_ids"][0])
        host["vision.segment_ids"] = (np.arange(n) // 256 + 1).astype(np.int32)
        host["vision.window_segment_ids"] = host["vision.segment_ids"]
    return float(step_flops(config, host))


# --------------------------------------------------------------------- FLOPs in the compiled HLO

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP = re.compile(r"^([\w\-]+)\((.*)$")
_CALLED = re.compile(r"(?:calls|body|to_apply|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]$")


def _dims(shape: str) -> list[int] | None:
    m = _SHAPE.match(shape)
    if not m:
        return None
    return [int(d) for d in m.group(1).split(",") if d]


def _operands(rest: str) -> list[str]:
    head = rest.split(")", 1)[0]
    return [a.strip().lstrip("%") for a in head.split(",") if a.strip()]


def _split_instruction(text: str) -> tuple[str, str, str] | None:
    """'TYPE op(operands), attributes' -> (TYPE without layout, op, 'operands), attributes');
    TYPE may be a tuple '(s32[], f32[2]{0})'."""
    if text.startswith("("):
        depth, end = 0, len(text)
        for pos, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = pos + 1
                break
        shape, rest = text[:end], text[end:].lstrip()
    else:
        shape, _, rest = text.partition(" ")
        shape = shape.split("{", 1)[0]
    m = _OP.match(rest)
    return (shape, m.group(1), m.group(2)) if m else None


def _parse_hlo(text: str) -> tuple[dict[str, list[tuple]], str | None]:
    """{computation: [(name, shape, op, rest)]}, and the entry computation's name. An
    instruction may run over several lines (kernel metadata in its attributes); a computation
    ends at a line that is just '}'."""
    comps: dict[str, list[tuple]] = {}
    entry, current = None, None
    pending: list[str] = []  # the instruction being read: name, then its text's lines

    def flush() -> None:
        if pending and current is not None:
            parsed = _split_instruction(" ".join(pending[1:]))
            if parsed:
                comps[current].append((pending[0], *parsed))
        pending.clear()

    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            flush()
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if line.strip() == "}":
            flush()
            current = None
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            flush()
            pending.extend(m.groups())
        elif pending:
            pending.append(line.strip())
    flush()
    return comps, entry


def _dot_flops(out: list[int], lhs: list[int] | None, rest: str) -> float:
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if lhs is None or not m:
        return 0.0
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    return 2.0 * math.prod(out) * k


def _conv_flops(
    out: list[int], rhs: list[int] | None, rest: str, lhs: list[int] | None = None
) -> float:
    """Convolutions (TPU writes matmuls as 1x1 convolutions, and batched ones as convolutions
    whose window runs over a padded batch dimension): 2 x output elements x the kernel taps that
    meet the input per output feature. A spatial window longer than the input (padding on both
    sides: each output position meets one input position of a size-1 dimension) counts only the
    input's length, and a dilated input only its real positions under the window."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->", rest)
    if rhs is None or not m or len(m.group(2)) != len(rhs):
        return 0.0
    lhs_size = dict(zip(m.group(1), lhs)) if lhs and len(lhs) == len(m.group(1)) else {}
    dilated = re.search(r"lhs_dilate=([\dx]+)", rest)
    dilation = [int(x) for x in dilated.group(1).split("x")] if dilated else []
    per_output = 1
    for label, d in zip(m.group(2), rhs):
        if label == "o":
            continue
        if label.isdigit() and label in lhs_size:
            # taps on real input: a dilated input (a batched matmul written as a convolution
            # with lhs_dilate = window) leaves one real position under each window
            step = dilation[int(label)] if int(label) < len(dilation) else 1
            d = min(d, lhs_size[label], -(-d // step))
        per_output *= d
    return 2.0 * math.prod(out) * per_output


def _trip_count(
    comps: dict[str, list[tuple]],
    condition: str,
    rest: str,
    body: str | None = None,
    caller: str | None = None,
) -> int | None:
    """A while loop's trip count: the backend's known_trip_count, else that of a counted loop
    `i < N` over a tuple element the body steps by a constant (the TPU compiler's windowed
    einsums, unrolled twice, step by 2) from its initial value in the caller (0 if not a
    constant): ceil((N - start) / step)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    if m:
        return int(m.group(1))
    cond = comps.get(condition, [])
    consts = {name: _constant(r) for name, _, op, r in cond if op == "constant"}
    gtes = {name: _tuple_index(r) for name, _, op, r in cond if op == "get-tuple-element"}
    for _, _, op, r in cond:
        if op != "compare" or "direction=LT" not in r:
            continue
        args = _operands(r)
        if len(args) != 2 or consts.get(args[1]) is None:
            continue
        bound, k = consts[args[1]], gtes.get(args[0])
        start, step = 0, 1
        if k is not None:
            step = _counter_step(comps.get(body or "", []), k) or 1
            start = _initial_element(comps.get(caller or "", []), rest, k) or 0
        return max(0, -(-(bound - start) // step))
    return None


def _constant(rest: str) -> int | None:
    m = re.match(r"\s*(-?\d+)\)", rest)
    return int(m.group(1)) if m else None


def _tuple_index(rest: str) -> int | None:
    m = re.search(r"index=(\d+)", rest)
    return int(m.group(1)) if m else None


def _tuple_operands(rest: str) -> list[str]:
    return _operands(re.sub(r"/\*[^*]*\*/", "", rest))


def _counter_step(body: list[tuple], k: int) -> int | None:
    """The constant a loop body adds to tuple element k (None when it does something else)."""
    roots = [r for _, _, op, r in body if op == "tuple"]
    if not roots:
        return None
    outs = _tuple_operands(roots[-1])
    if k >= len(outs):
        return None
    insts = {name: (op, r) for name, _, op, r in body}

    def source(name: str) -> str:  # through copies (the compiler copies loop counters)
        while insts.get(name, ("",))[0] in ("copy", "bitcast"):
            name = (_operands(insts[name][1]) + [""])[0]
        return name

    op, r = insts.get(source(outs[k]), ("", ""))
    if op != "add":
        return None
    a, b = (source(x) for x in (_operands(r) + ["", ""])[:2])
    for x, y in ((a, b), (b, a)):
        counter = insts.get(x, ("",))[0] == "get-tuple-element" and _tuple_index(insts[x][1]) == k
        if counter and insts.get(y, ("",))[0] == "constant":
            return _constant(insts[y][1])
    return None


def _initial_element(caller: list[tuple], rest: str, k: int) -> int | None:
    """Tuple element k of a while loop's initial value, when the caller builds it from a
    constant."""
    init = _operands(rest)[:1]
    insts = {name: (op, r) for name, _, op, r in caller}
    op, r = insts.get(init[0], ("", "")) if init else ("", "")
    if op != "tuple":
        return None
    elements = _tuple_operands(r)
    if k >= len(elements):
        return None
    op, r = insts.get(elements[k], ("", ""))
    return _constant(r) if op == "constant" else None


_UNTIMED = re.compile(r'custom_call_target="PrepareAsyncCall(?:Start|Done)"')


def compiler_seconds(cost: Mapping[str, Any], hlo: str) -> float | None:
    """The TPU compiler's time for a compiled step (while bodies once), None when it gives none
    (a host compiler). Its `optimal_seconds` adds -1 for each PrepareAsyncCallStart/Done custom
    call (which it cannot time: the asynchronous calls around sorts and ragged collectives of
    the MoE layers), so such a step reads -2 or -10 plus its time; the time of the others is
    `optimal_seconds` plus their count. The untimed calls count as no time."""
    raw = cost.get("optimal_seconds")
    if raw is None:
        return None
    seconds = float(raw) + len(_UNTIMED.findall(hlo))
    return seconds if seconds > 0 else None


# matmuls of T x S x head_dim per head in each splash attention kernel: the forward (scores,
# values), dq (scores, dP, dQ) and dkv (scores, dP, dV, dK)
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(
    name: str, q: list[int] | None, k: list[int] | None, mask: list[int] | None = None
) -> float:
    """A splash attention kernel's FLOPs from its q [..., H, T, D] and k [..., K, S, D] operands
    (it declares no cost estimate; leading dimensions: rows of a batch the kernel is mapped
    over). `mask`: the shape of its first operand, the block map [masks, query blocks, key
    blocks] of which the kernel's grid keeps only as many blocks a row (or column, for dk/dv)
    as the mask visits at most: a local mask's few near the diagonal. The visited blocks are
    counted whole, masked ones within them included: an upper bound."""
    kind = name.removeprefix("splash_mha_").split("_", 1)[0]
    if q is None or k is None or len(q) < 3 or len(k) != len(q) or kind not in _SPLASH_MATMULS:
        return 0.0
    visited = 1.0
    if mask is not None and len(mask) == 3:  # the query and key blocks are alike (T == S)
        visited = min(mask[1], mask[2]) / max(mask[1], mask[2])
    *rows, H, T, D = q
    return 2.0 * _SPLASH_MATMULS[kind] * math.prod(rows) * H * T * k[-2] * D * visited


def hlo_matmul_flops(text: str) -> dict[str, float]:
    """The matmul FLOPs of a compiled module's HLO text, per device: dots, ragged dots and
    convolutions, `once` counting each while body once (as XLA's cost analysis does) and
    `with_trips` counting it its trip count times; conditionals count their costliest branch.
    `kernels`: the FLOPs of the Pallas kernels that declare no cost estimate (splash attention:
    its matmuls over the blocks its mask visits), with trip counts. The TPU compiler prices a
    kernel call that declares an estimate (the megablox grouped matmuls) itself, at the larger
    of its declared FLOPs and bytes at the chip's rates, and one that declares none by its
    operands' bytes alone. `unknown_loops`: loops whose trip count could not be read (counted
    once).
    """
    comps, entry = _parse_hlo(text)
    memo: dict[tuple[str, bool, bool], float] = {}
    unknown: set[str] = set()

    def cost(name: str, trips: bool, kernels: bool) -> float:
        key = (name, trips, kernels)
        if key in memo:
            return memo[key]
        memo[key] = 0.0  # recursion guard
        shapes = {n: _dims(s) for n, s, _, _ in comps.get(name, [])}
        total = 0.0
        for inst, _, op, rest in comps.get(name, []):
            out = shapes.get(inst)
            args = _operands(rest)
            if op in ("dot", "ragged-dot") and out is not None and args and not kernels:
                total += _dot_flops(out, shapes.get(args[0]), rest)
            elif op == "convolution" and out is not None and len(args) > 1 and not kernels:
                total += _conv_flops(out, shapes.get(args[1]), rest, shapes.get(args[0]))
            elif (
                op == "custom-call" and kernels and inst.startswith("splash_mha_") and len(args) > 3
            ):
                # (kernels that declare their cost are in the compiler's own time)
                q, k, mask = (shapes.get(args[i]) for i in (2, 3, 0))
                total += _splash_flops(inst, q, k, mask)
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                cond = re.search(r"condition=%?([\w.\-]+)", rest)
                n = (
                    _trip_count(comps, cond.group(1), rest, body and body.group(1), name)
                    if cond
                    else None
                )
                if n is None:
                    unknown.add(inst)
                inner = cost(body.group(1), trips, kernels) if body else 0.0
                total += inner * (n if trips and n is not None else 1)
            elif op == "conditional":
                m = _BRANCHES.search(rest)
                branches = [b.strip().lstrip("%") for b in m.group(1).split(",")] if m else []
                total += max((cost(b, trips, kernels) for b in branches), default=0.0)
            elif op in ("fusion", "call", "custom-call", "async-start"):
                total += sum(cost(c, trips, kernels) for c in _CALLED.findall(rest))
        memo[key] = total
        return total

    if entry is None:
        return {"once": 0.0, "with_trips": 0.0, "kernels": 0.0, "unknown_loops": 0}
    return {
        "once": cost(entry, False, False),
        "with_trips": cost(entry, True, False),
        "kernels": cost(entry, True, True),
        "unknown_loops": len(unknown),
    }


_COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape ('f32[4,8]', or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = int(re.sub(r"\D", "", dtype) or 8) if dtype != "pred" else 8
        total += math.prod(int(d) for d in dims.split(",") if d) * max(bits // 8, 1)
    return total


def hlo_collectives(text: str) -> dict[str, Any]:
    """The collectives of a compiled module's HLO text, each instruction counted once: how many
    of each kind, and the bytes of the largest all-reduce (a gradient reduced whole shows up as
    an all-reduce the size of its parameter; reduce-scattered, it does not)."""
    comps, _ = _parse_hlo(text)
    counts = dict.fromkeys(_COLLECTIVES, 0)
    largest = 0
    for body in comps.values():
        for _, shape, op, _ in body:
            kind = op.removesuffix("-start")
            if kind in counts:
                counts[kind] += 1
                if kind == "all-reduce":
                    largest = max(largest, _shape_bytes(shape))
    return {"counts": counts, "largest_all_reduce_bytes": largest}


# ---------------------------------------------------------------------------------- the plan


def _loop_bodies(
    trainer, state, batch, frozen, compiler_s: float, once: float
) -> dict[str, float] | None:
    """The compiler's time per matmul FLOP of the layer loops' bodies: the step compiled again
    with every layer scan unrolled twice has one more copy of each body, and the differences of
    the compiler's time and of the matmul FLOPs (each loop body counted once) are the bodies'.
    None when the second compile adds no time or no FLOPs (no layer loops)."""
    jax.clear_caches()  # the step is traced anew, with the unrolled scans
    t0 = time.perf_counter()
    with unrolled_layer_scans(2):
        twice = trainer.compile(state, batch, frozen=frozen)
    seconds = time.perf_counter() - t0
    cost = twice.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    hlo = twice.as_text()
    t2 = compiler_seconds(cost, hlo)
    f2 = hlo_matmul_flops(hlo)["once"]
    if t2 is None or t2 <= compiler_s or f2 <= once:
        return None
    return {
        "s_per_flop": (t2 - compiler_s) / (f2 - once),
        "body_s": t2 - compiler_s,
        "body_flops": f2 - once,
        "compile_s": seconds,
    }


def plan(
    cfg: TrainConfig, topology_name: str, hlo_path: str | None = None, time_loops: bool = True
) -> dict[str, Any]:
    """Compile the run's train step for the topology and report memory, fit and speed (and
    write the compiled HLO text to `hlo_path`, when given). time_loops: compile a second time
    with the layer scans unrolled twice to time the loop bodies (see `_loop_bodies`); without
    it, the whole step's time scales with the matmul FLOPs of the loops' trips."""
    from qwenvl_jax.train.loop import batch_shards

    topo = topology(topology_name)
    trainer, config, mesh = build_trainer(cfg, topo.devices)
    shapes = batch_shapes(cfg, config, batch_shards(mesh, cfg.batch_size))
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_sharding(k, s))
        for k, (s, d) in shapes.items()
    }
    state, frozen = trainer.abstract_state(), trainer.abstract_frozen()
    pixels = shapes["vision.pixels"][0] if "vision.pixels" in shapes else None
    chip = {
        "params": per_device_bytes(state["params"]),
        "optimizer": per_device_bytes(state["opt_state"]),
        "frozen": per_device_bytes(frozen),
        "batch": per_device_bytes(batch),
    }
    head = {
        "topology": topo.name,
        "chip": topo.chip,
        "chips": len(topo.devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "mesh_auto": cfg.mesh.auto,
        "family": config.family,
        "model": cfg.model,
        "stage": cfg.stage,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "vision_patches": math.prod(pixels[:2]) if pixels else 0,
        "vision_groups": pixels[0] if pixels else 0,
        "remat": cfg.remat,
        "scan_layers": cfg.scan_layers,
        "hbm_bytes": topo.hbm_bytes,
    }
    t0 = time.perf_counter()
    try:
        compiled = trainer.compile(state, batch, frozen=frozen)
    except jax.errors.JaxRuntimeError as e:
        need = _out_of_memory(str(e))
        if need is None:
            raise
        # the TPU compiler refuses a program whose temporaries exceed HBM: that is the answer
        chip["temporaries"], chip["code"] = need, 0
        chip["total"] = sum(chip.values())
        return {
            **head,
            "per_chip_bytes": chip,
            "fits": False,
            "compile_s": time.perf_counter() - t0,
            "est_step_s": None,
            "est_mfu": None,
        }
    compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    chip["temporaries"] = int(mem.temp_size_in_bytes)
    chip["code"] = int(mem.generated_code_size_in_bytes)
    chip["total"] = int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    flops = hlo_matmul_flops(hlo)
    scale = flops["with_trips"] / flops["once"] if flops["once"] else 1.0
    # splash attention's matmuls at peak (the compiler prices those kernels by their bytes)
    kernels_s = flops["kernels"] / topo.peak_flops
    compiler_s = compiler_seconds(cost, hlo)
    bodies = None
    if compiler_s is not None and time_loops:
        bodies = _loop_bodies(trainer, state, batch, frozen, compiler_s, flops["once"])
    if bodies is not None:
        # the loops' repeated trips at the time per matmul FLOP of their own bodies
        est = compiler_s + bodies["s_per_flop"] * (flops["with_trips"] - flops["once"])
        est += kernels_s
        source = "compiler, loop bodies timed"
    elif compiler_s is not None:
        est = compiler_s * scale + kernels_s
        source = "compiler"
    else:  # the host compiler gives no time: its FLOP count at the device's peak
        est = float(cost.get("flops", 0.0)) * scale / topo.peak_flops + kernels_s
        source = "compiler FLOPs / peak"
    model_flops = full_batch_flops(config, shapes)  # one micro-batch: one compiled step
    peak_all = topo.peak_flops * len(topo.devices)
    est_mfu = model_flops / (est * peak_all) if est > 0 else 0.0
    return {
        **head,
        "per_chip_bytes": chip,
        "fits": chip["total"] <= topo.hbm_bytes,
        "compile_s": compile_s,
        "compiler_flops_per_chip": float(cost.get("flops", 0.0)),
        "compiler_optimal_seconds": float(cost.get("optimal_seconds", 0.0)),
        "compiler_s": compiler_s,
        "hlo_matmul_flops_per_chip": flops["with_trips"],
        "hlo_matmul_flops_once_per_chip": flops["once"],
        "kernel_flops_per_chip": flops["kernels"],
        "loop_scale": scale,
        "loop_bodies": bodies,
        "unknown_loops": flops["unknown_loops"],
        "est_step_s": est,
        "est_source": source,
        "model_flops": model_flops,
        "est_mfu": est_mfu,
        "collectives": hlo_collectives(hlo),
    }


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _out_of_memory(message: str) -> int | None:
    """The bytes of temporaries a TPU compiler's out-of-memory refusal names, or None."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGTP]?)\)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def format_plan(r: Mapping[str, Any]) -> str:
    def gib(b: float) -> str:
        return f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:8.2f} MiB"

    c = r["per_chip_bytes"]
    lines = [
        f"{r['family']} ({r['model']}) stage {r['stage']}: {r['batch_size']} x {r['seq_len']} "
        f"tokens, {r['vision_patches']} vision patches, remat {r['remat']}",
        f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}"
        + (" (chosen: mesh auto)" if r.get("mesh_auto") else ""),
        "per chip:",
        f"  parameters   {gib(c['params'])}",
        f"  optimizer    {gib(c['optimizer'])}",
        f"  frozen       {gib(c['frozen'])}",
        f"  batch        {gib(c['batch'])}",
        f"  temporaries  {gib(c['temporaries'])}",
        f"  total        {gib(c['total'])} of {gib(r['hbm_bytes']).strip()} HBM: "
        + ("fits" if r["fits"] else "does NOT fit")
        + f" ({100 * (1 - c['total'] / r['hbm_bytes']):.0f}% to spare)" * bool(r["fits"]),
    ]
    if r["est_step_s"] is None:
        lines.append(f"compile {r['compile_s']:.1f} s: refused by the compiler (out of memory)")
    else:
        lines.append(
            f"compile {r['compile_s']:.1f} s; estimated step {r['est_step_s']:.4g} s "
            f"({r['est_source']}, loops x{r['loop_scale']:.2f}); MFU {100 * r['est_mfu']:.1f}%"
        )
        if r.get("loop_bodies"):
            b = r["loop_bodies"]
            lines.append(
                f"loop bodies: {b['body_s']:.4g} s for {b['body_flops']:.4g} matmul FLOPs "
                f"(a second compile, scans unrolled twice: {b['compile_s']:.1f} s)"
            )
        n = r["collectives"]["counts"]
        lines.append(
            f"collectives: {n['all-reduce']} all-reduce (largest "
            f"{gib(r['collectives']['largest_all_reduce_bytes']).strip()}), "
            f"{n['reduce-scatter']} reduce-scatter, {n['all-gather']} all-gather, "
            f"{n['all-to-all']} all-to-all"
        )
    return "\n".join(lines)


__all__ = [
    "CHIPS",
    "batch_shapes",
    "format_plan",
    "hlo_collectives",
    "hlo_matmul_flops",
    "plan",
    "topology",
]
