"""Training checkpoints with Orbax's CheckpointManager, and the SIGTERM save.

A checkpoint at optimiser step s (folder `WORKDIR/checkpoints/<s>/`) holds `state` (step,
trainable parameters, optimiser state), `frozen` (the frozen parameters, so a resume needs
nothing but the checkpoint) and `data` (the data iterator's JSON state), plus `meta`. Saves are
asynchronous (the arrays are copied off the devices, then written in the background) and
committed by an atomic rename, so a run killed at any moment leaves the previous checkpoints
intact and an unfinished one that the next start ignores. Only the newest `keep` are kept.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from qwenvl_jax.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, frozen: Any, data_state: Any, meta: dict, *, wait: bool = False
    ) -> None:
        """Start saving (returns once the arrays are off the devices, unless `wait`)."""
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": data_state}),
            meta=ocp.args.JsonSave(meta),
        )
        if jax.tree.leaves(frozen):  # stage 2 trains everything: nothing frozen to save
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.manager.wait_until_finished()
        log.info("checkpoint %d %s", step, "saved" if wait else "saving")

    def meta(self, step: int) -> dict:
        """The `meta` item of checkpoint `step` (the run config that wrote it), read alone."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(
        self, step: int, abstract_state: Any, abstract_frozen: Any
    ) -> tuple[Any, Any, Any, dict]:
        """(state, frozen, data iterator state, meta) of checkpoint `step`, each array read
        straight into the sharding of its abstract target."""
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        has_frozen = bool(jax.tree.leaves(abstract_frozen))
        if has_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # a checkpoint of another model or config, or a damaged one
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"{self.directory / str(step)}: cannot restore ({type(e).__name__}: {first})"
            ) from e
        frozen = out["frozen"] if has_frozen else abstract_frozen
        return out["state"], frozen, out["data"]["iterator"], out["meta"]

    def close(self) -> None:
        """Wait for a save in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


class StopSignal:
    """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step, so the
    step in progress finishes and a checkpoint is saved before the process exits."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


__all__ = ["Checkpoints", "StopSignal"]
