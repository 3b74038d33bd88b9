"""Per-expert MoE checkpoints seen as fused ones.

Qwen3-VL-MoE checkpoints store the experts of a layer fused (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), but block-quantised (FP8) and some converted checkpoints store one 2-D
Linear per expert (`mlp.experts.<e>.{gate,up,down}_proj.weight`). `FusedExpertsReader` presents the
latter as the former, in transformers' in-memory layout ((E, 2I, H) with gate rows first, and
(E, H, I)), reading one expert at a time, so the key tables and both loaders need no second path.
Wrap it outside `Fp8DequantReader`, so each expert is dequantised with its own scales first.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

import numpy as np

from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading.reader import MissingTensorError, TensorInfo, TensorReader

_EXPERT = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)


class FusedExpertsReader(TensorReader):
    def __init__(self, reader: TensorReader):
        self.reader = reader
        groups: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        passthrough = []
        names = reader.keys()
        for key in names:
            m = _EXPERT.match(key)
            if m:
                groups[m["prefix"]][m["proj"]][int(m["e"])] = key
            else:
                passthrough.append(key)
        self._virtual: dict[str, tuple[str, list[list[str]]]] = {}
        self._info: dict[str, TensorInfo] = {}
        for prefix, projs in groups.items():
            n = max(max(ids) for ids in projs.values()) + 1
            for proj in ("gate", "up", "down"):
                missing = sorted(set(range(n)) - set(projs.get(proj, {})))
                if missing:
                    raise CheckpointError(
                        f"checkpoint lacks tensor {prefix}.{missing[0]}.{proj}_proj.weight "
                        f"({len(missing)} expert(s) of {n} missing)"
                    )
            gate, up, down = ([projs[p][e] for e in range(n)] for p in ("gate", "up", "down"))
            shapes = {reader.shape(k) for k in gate + up}
            if len(shapes) != 1 or len({reader.shape(k) for k in down}) != 1:
                raise CheckpointError(f"{prefix}: experts of different shapes")
            ((i, h),) = shapes
            info = reader.info(gate[0])
            self._virtual[f"{prefix}.gate_up_proj"] = ("gate_up", [gate, up])
            self._info[f"{prefix}.gate_up_proj"] = TensorInfo((n, 2 * i, h), info.dtype, info.file)
            self._virtual[f"{prefix}.down_proj"] = ("down", [down])
            dh, di = reader.shape(down[0])
            self._info[f"{prefix}.down_proj"] = TensorInfo((n, dh, di), info.dtype, info.file)
        self._keys = sorted(passthrough + list(self._virtual))

    @property
    def fused(self) -> bool:
        """Whether the checkpoint stores experts one by one."""
        return bool(self._virtual)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        if key in self._info:
            return self._info[key]
        if _EXPERT.match(key):
            raise MissingTensorError(f"{key!r} is read through its fused experts tensor")
        return self.reader.info(key)

    def get(self, key: str) -> np.ndarray:
        if key not in self._virtual:
            self.info(key)
            return self.reader.get(key)
        kind, lists = self._virtual[key]
        info = self._info[key]
        out = np.empty(info.shape, info.dtype)
        for e in range(info.shape[0]):
            if kind == "gate_up":
                gate, up = (self.reader.get(lst[e]) for lst in lists)
                half = gate.shape[0]
                out[e, :half], out[e, half:] = gate, up
            else:
                out[e] = self.reader.get(lists[0][e])
        return out

    def close(self) -> None:
        self.reader.close()


_FUSED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_experts(key: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `FusedExpertsReader`: a fused expert tensor in transformers' layout
    ((E, 2I, H) gate rows first, or (E, H, I)) as one 2-D weight per expert; any other tensor
    as it is."""
    m = _FUSED.match(key)
    if m is None:
        yield key, array
        return
    prefix = m["prefix"]
    for e in range(array.shape[0]):
        if m["kind"] == "gate_up_proj":
            half = array.shape[1] // 2
            yield f"{prefix}.{e}.gate_proj.weight", array[e, :half]
            yield f"{prefix}.{e}.up_proj.weight", array[e, half:]
        else:
            yield f"{prefix}.{e}.down_proj.weight", array[e]


def fuse_experts(reader: TensorReader) -> TensorReader:
    """The reader itself when it has no per-expert tensors, else a fusing view of it."""
    view = FusedExpertsReader(reader)
    return view if view.fused else reader
