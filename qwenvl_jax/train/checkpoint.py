"""Training checkpoints with Orbax's CheckpointManager, and the SIGTERM save.

A checkpoint at optimiser step s (folder `WORKDIR/checkpoints/<s>/`) holds `state` (step,
trainable parameters, optimiser state), `frozen` (the frozen parameters, so a resume needs
nothing but the checkpoint) and `data` (the data iterator's JSON state), plus `meta`. Saves are
asynchronous (the arrays are copied off the devices, then written in the background) and
committed by an atomic rename, so a run killed at any moment leaves the previous checkpoints
intact and an unfinished one that the next start ignores. Only the newest `keep` are kept.

A committed checkpoint that cannot be read back (a file truncated by a full disk or a broken
copy) raises CheckpointError with a one-line reason; `set_aside` renames it to
`<step>.unreadable`, which Orbax does not count as a step, so the run can resume from an older one
and save that step anew.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from qwenvl_jax import multihost
from qwenvl_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """The committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(
        self, step: int, state: Any, frozen: Any, data_state: Any, meta: dict, *, wait: bool = False
    ) -> None:
        """Start saving (returns once the arrays are off the devices, unless `wait`). Every
        process calls it; `data_state` is this process's iterator state, and the checkpoint
        keeps all processes' (written once, by the first)."""
        iterators = multihost.gather_json(data_state)
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterators": iterators}),
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
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(
        self, step: int, abstract_state: Any, abstract_frozen: Any
    ) -> tuple[Any, Any, Any, dict]:
        """(state, frozen, this process's data iterator state, meta) of checkpoint `step`, each
        array read straight into the sharding of its abstract target."""
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        has_frozen = bool(jax.tree.leaves(abstract_frozen))
        if has_frozen:
            items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
        out = self._restore(step, **items)
        frozen = out["frozen"] if has_frozen else abstract_frozen
        iterators = out["data"].get("iterators") or [out["data"].get("iterator")]
        if len(iterators) != jax.process_count():
            raise ConfigError(
                f"{self.path(step)} was written by {len(iterators)} processes, this run has "
                f"{jax.process_count()}: the data iterators cannot resume"
            )
        return out["state"], frozen, iterators[jax.process_index()], out["meta"]

    def _restore(self, step: int, **items: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # a checkpoint of another model or config, or a damaged one
            message = f"{self.path(step)}: cannot restore ({reason(e)})"
            log.debug("restoring %s failed", self.path(step), exc_info=True)
        _collect_abandoned_reads()
        raise CheckpointError(message)

    def set_aside(self, step: int) -> Path:
        """Rename checkpoint `step` to `<step>.unreadable` (`.unreadable.1`, ... when taken), out
        of the manager's steps; returns the new path. On a multi-host run the first process
        renames and the others wait for it."""
        target = self.directory / f"{step}.unreadable"
        n = 0
        while target.exists():
            n += 1
            target = self.directory / f"{step}.unreadable.{n}"
        if jax.process_index() == 0:
            self.path(step).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        return target

    def close(self) -> None:
        """Wait for a save in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


_ORBAX_DIR = f"{os.sep}orbax{os.sep}"


def _from_abandoned_read(unraisable: Any) -> bool:
    """Whether an unraisable exception comes from the reads a failed restore left behind: one of
    Orbax's read coroutines finalised unfinished, or a TensorStore thread handing a finished read
    to the closed event loop (RuntimeError in `call_soon_threadsafe`)."""
    obj, exc = unraisable.object, unraisable.exc_value
    if asyncio.iscoroutine(obj):
        return _ORBAX_DIR in getattr(getattr(obj, "cr_code", None), "co_filename", "")
    if obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        frames = traceback.extract_tb(unraisable.exc_traceback)
        return any(f.name == "call_soon_threadsafe" for f in frames)
    return False


class _AbandonedReadTasks(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of errors Orbax raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "exception was never retrieved" not in record.getMessage():
            return True
        frames = traceback.extract_tb(exc.__traceback__)
        return not any(_ORBAX_DIR in f.filename for f in frames)


_quiet = False


def _collect_abandoned_reads() -> None:
    """Silence, then collect, the reads a failed restore left behind.

    When one array read of a restore fails, Orbax closes its event loop with the other reads of
    that restore still pending. They report themselves later, each with a traceback: TensorStore
    threads whose reads finish find the loop closed ("Event loop is closed"), and the unfinished
    coroutines and tasks, once garbage-collected, raise their read error again ("Exception
    ignored in: <coroutine ...>", "Task exception was never retrieved"). From the first failed
    restore on, those reports (and only those) are dropped for the rest of the process, so the
    one-line warning or error is all a user sees."""
    global _quiet
    if not _quiet:
        _quiet = True
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            if not _from_abandoned_read(unraisable):
                previous(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(_AbandonedReadTasks())
        # a read coroutine created but never started warns when it is finalised, which can
        # be as late as interpreter shutdown ("sys:1: RuntimeWarning: coroutine ... was never
        # awaited")
        names = "|".join(sorted(_orbax_coroutines()))
        if names:
            warnings.filterwarnings(
                "ignore", f"coroutine '({names})' was never awaited", RuntimeWarning
            )
    gc.collect()


def _orbax_coroutines() -> set[str]:
    """The qualified names of the coroutine functions of the loaded Orbax modules (module
    level and class methods), escaped for a regular expression."""
    import re

    names = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("orbax.") or module is None:
            continue
        for obj in list(vars(module).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) else []
            for f in (obj, *members):
                f = getattr(f, "__func__", f)
                if inspect.iscoroutinefunction(f) and getattr(f, "__module__", "") == name:
                    names.add(re.escape(f.__qualname__))
    return names


def reason(e: BaseException) -> str:
    """`Type: message` of the innermost cause of `e`, on one line: Orbax wraps a TensorStore
    read error in an exception whose text is the whole TensorStore spec, the cause names the
    file and what is wrong with it."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = " ".join(lines)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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


__all__ = ["Checkpoints", "StopSignal", "reason"]
