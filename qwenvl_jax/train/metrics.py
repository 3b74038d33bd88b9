"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, the loss plot, and the
peak FLOP/s that MFU is measured against.

TensorBoard is not a dependency: `EventWriter` writes its file format directly (TFRecord framing
with masked CRC-32C around hand-encoded `Event` protos holding scalar summaries), which
TensorBoard reads from `WORKDIR/tensorboard/`. A resumed run starts a new event file with a
SessionLog START at the resumed step, so TensorBoard drops the steps the crash left behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ CRC-32C


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------ protobuf bits


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(
    wall_time: float,
    step: int,
    *,
    scalars: Mapping[str, float] | None = None,
    file_version: str | None = None,
    session_start: bool = False,
) -> bytes:
    """A tensorflow `Event` proto: wall_time (1), step (2), file_version (3), summary (5) of
    simple_value scalars, session_log (6) with status START."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
            for tag, v in scalars.items()
        )
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(6, _field(1, 0, _varint(1)))
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def read_records(path: str | Path) -> list[bytes]:
    """The records of a TFRecord file, CRCs checked (for tests and tools)."""
    raw = Path(path).read_bytes()
    out, i = [], 0
    while i < len(raw):
        header = raw[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        (hc,) = struct.unpack("<I", raw[i + 8 : i + 12])
        data = raw[i + 12 : i + 12 + n]
        (dc,) = struct.unpack("<I", raw[i + 12 + n : i + 16 + n])
        if hc != masked_crc32c(header) or dc != masked_crc32c(data):
            raise ValueError(f"{path}: CRC mismatch at byte {i}")
        out.append(data)
        i += 16 + n
    return out


class EventWriter:
    """Scalars to a TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str | Path, start_step: int = 0):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._f = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))
        if start_step:
            self._write(encode_event(time.time(), start_step, session_start=True))

    def _write(self, event: bytes) -> None:
        self._f.write(frame_record(event))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
        self._write(encode_event(time.time(), step, scalars=finite))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------ the run's log


class MetricsLog:
    """metrics.jsonl (one object per logged step), TensorBoard scalars and the loss plot.

    Started at `resume_step`, records of later steps (written after the checkpoint the run
    resumes from) are dropped first, so the file reads as one uninterrupted run. With
    `enabled=False` (every process but the first of a multi-host run) nothing is written.
    """

    def __init__(
        self,
        workdir: str | Path,
        resume_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
    ):
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.enabled = enabled
        self._f = self.events = None
        if not enabled:
            return
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.events = None
        if tensorboard:
            self.events = EventWriter(self.workdir / "tensorboard", resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.events is not None:
            step = int(record["step"])
            self.events.scalars(step, {f"train/{k}": v for k, v in record.items() if k != "step"})

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_losses(self.records, self.workdir / "loss.png")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self.events is not None:
            self.events.close()


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Loss curves (total, cross-entropy, MoE aux when present) and the learning rate, as PNG."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], label="loss", lw=1.2)
    if any(r.get("aux_loss") for r in records):
        ax.plot(steps, [r.get("ce", math.nan) for r in records], label="cross-entropy", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(
        steps,
        [r.get("learning_rate", math.nan) for r in records],
        color="gray",
        lw=0.8,
        ls="--",
        label="learning rate",
    )
    lr.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = lr.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ MFU

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}

_measured: dict[str, float] = {}


def measured_matmul_flops(n: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a float32 n x n matmul on the default device: the achievable peak of a device
    with no published figure (a CPU)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: Any, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override`, the table, or (CPU) a measured matmul rate."""
    if override:
        return float(override)
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    if kind not in _measured:
        _measured[kind] = measured_matmul_flops()
        log.info("peak FLOP/s of %r measured as %.3g", kind, _measured[kind])
    return _measured[kind]


__all__ = [
    "EventWriter",
    "MetricsLog",
    "crc32c",
    "encode_event",
    "peak_flops",
    "plot_losses",
    "read_records",
]
