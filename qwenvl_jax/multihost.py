"""Running one training program on several processes (hosts) at once.

`initialize` joins the processes through `jax.distributed` before anything touches a device:
with a coordinator address, process count and id given (any cluster), or with none on clusters
JAX recognises by their environment (TPU VMs, SLURM, ...). Afterwards every process runs the
same program over the global mesh, feeds its own rows of each batch, and the checkpoint holds
each process's data-iterator state (`gather_json`), so every process resumes where it was.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from qwenvl_jax.errors import ConfigError

log = logging.getLogger(__name__)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join the run's processes; True when this is a multi-process run. Without arguments it
    joins only where a cluster environment says there are several processes."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes == 1:
            return False
        _cpu_collectives()
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _in_cluster():
        _cpu_collectives()
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d", jax.process_index(), jax.process_count())
    return jax.process_count() > 1


def _in_cluster() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _cpu_collectives() -> None:
    """Processes on CPUs reduce over gloo (the host platform has no cross-process collectives
    otherwise); accelerators use their own interconnect."""
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (on every process)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(rows, np.asarray(sizes).reshape(-1), strict=True)
    ]


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_lead() -> bool:
    """Whether this process is the one that writes files shared by all (process 0)."""
    return jax.process_index() == 0


__all__ = ["barrier", "gather_json", "initialize", "is_lead"]
