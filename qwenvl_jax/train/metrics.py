"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, the loss plot, and the
peak FLOP/s that MFU is measured against.

The TensorBoard event files in `WORKDIR/tensorboard/` are written by tensorboardX (scalars tagged
`train/<key>`). A run resumed at step s starts a new event file that begins with a SessionLog
START at step s + 1, so TensorBoard drops what the interrupted run logged after its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How often the event writer's thread flushes to disk: a run watched in TensorBoard shows its
# steps within seconds; closing the log flushes the rest.
EVENTS_FLUSH_SECS = 5

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
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names the file by the whole second; the suffix keeps each run's file
            # apart and the names in start order, the order TensorBoard reads them in
            self.events = SummaryWriter(
                str(self.workdir / "tensorboard"),
                purge_step=resume_step + 1,
                flush_secs=EVENTS_FLUSH_SECS,
                filename_suffix=f".{time.time_ns()}.{os.getpid()}",
            )

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.events is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self.events.add_scalar(f"train/{k}", float(v), step)

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


__all__ = ["MetricsLog", "peak_flops", "plot_losses"]
