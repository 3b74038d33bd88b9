"""`qwenvl-jax train` stopped by SIGTERM, then killed with SIGKILL, resumes each time from its
newest checkpoint and reproduces the losses of an uninterrupted run step for step, exactly, and
the same final weights.

The runs are CLI subprocesses on a tiny Qwen2-VL with synthetic batches and the shipped stage 3
config (ViT frozen), with gradient accumulation so the accumulator state is resumed too. They
share a JAX compilation cache, so restarts skip most compiling. A newest checkpoint damaged on
disk is set aside and the run resumes from the one before, to the same losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import qwenvl_jax as qj
from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.train.loop import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
ARGS = [
    "--config",
    str(REPO / "configs/train/qwen2_vl_stage3.yaml"),
    "--no-progress",
    "model=tiny_qwen2_vl",
    "data.train=synthetic",
    "data.distinct=4",  # four batches in turn: the loss falls, whatever the initial weights
    f"steps={STEPS}",
    "batch_size=2",
    "seq_len=64",
    "grad_accum=2",
    "checkpoint_every=4",
    "keep_checkpoints=2",
    "dtype=float32",
    "remat=none",
    "learning_rate=1e-3",
    "warmup_steps=5",
    "seed=3",
]


def start(workdir: Path, cache: Path, args: list[str] = ARGS) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "qwenvl_jax.cli", "train", "--workdir", str(workdir), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def signal_after(proc: subprocess.Popen, workdir: Path, steps: int, sig: int) -> None:
    """Send `sig` once metrics.jsonl reaches `steps` records."""
    deadline = time.time() + 400
    while len(records(workdir)) < steps:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(sig)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=400)
    return proc.returncode, err


def file_size(path: Path) -> int:
    return path.stat().st_size


def committed_checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_and_sigkill_resume_to_the_uninterrupted_losses(tmp_path):
    cache = tmp_path / "jax_cache"
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    rc, err = finish(start(ref_dir, cache))
    assert rc == 0, err[-2000:]
    reference = records(ref_dir)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]

    # SIGTERM: the step in flight finishes, a checkpoint of it is saved, exit status 143
    proc = start(run_dir, cache)
    signal_after(proc, run_dir, 6, signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == EXIT_PREEMPTED, err[-2000:]
    stopped = len(records(run_dir))
    assert 6 <= stopped < STEPS
    assert committed_checkpoints(run_dir)[-1] == stopped
    assert not (run_dir / "model").exists()

    # SIGKILL: no warning at all; the restart goes back to the newest complete checkpoint
    proc = start(run_dir, cache)
    signal_after(proc, run_dir, stopped + 9, signal.SIGKILL)
    finish(proc)
    killed_at = len(records(run_dir))
    assert killed_at < STEPS, "the run finished before SIGKILL"
    resume_from = committed_checkpoints(run_dir)[-1]
    assert resume_from < killed_at

    rc, err = finish(start(run_dir, cache))
    assert rc == 0, err[-2000:]
    resumed = records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["learning_rate"] for r in resumed] == [r["learning_rate"] for r in reference]
    assert len(committed_checkpoints(run_dir)) <= 2  # keep_checkpoints

    # WORKDIR/model: the same weights as the uninterrupted run's, the ViT untouched
    ours = qj.from_pretrained(run_dir / "model", dtype="float32")
    ref = qj.from_pretrained(ref_dir / "model", dtype="float32")
    init = build_model(load_config("tiny_qwen2_vl"), seed=3)
    flat = {k: v for k, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    for path, var in nnx.to_flat_state(nnx.state(ref, nnx.Param)):
        assert (
            np.asarray(flat[path].get_value()).tobytes() == np.asarray(var.get_value()).tobytes()
        ), path
    vit = jax.device_get(ours.visual.runs[0].attn.qkv.kernel.get_value())
    assert np.array_equal(vit, jax.device_get(init.visual.runs[0].attn.qkv.kernel.get_value()))
    merger = jax.device_get(ours.visual.merger.fc1.kernel.get_value())
    assert not np.array_equal(merger, jax.device_get(init.visual.merger.fc1.kernel.get_value()))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    """A checkpoint whose `meta` file or one of whose array files is cut short is set aside with a
    one-line warning naming it; the run resumes from the checkpoint before and repeats the same
    losses. With no checkpoint left to fall back to, the run refuses in one line."""
    steps, every = 6, 3
    args = [*ARGS, f"steps={steps}", f"checkpoint_every={every}"]
    cache = tmp_path / "jax_cache"
    ref_dir = tmp_path / "uninterrupted"
    rc, err = finish(start(ref_dir, cache, args))
    assert rc == 0, err[-2000:]
    reference = records(ref_dir)
    assert [r["step"] for r in reference] == list(range(1, steps + 1))
    assert committed_checkpoints(ref_dir) == [every, steps]

    newest = Path("checkpoints") / str(steps)
    damage = {
        "meta": lambda run: truncate(run / newest / "meta" / "metadata"),
        "array": lambda run: truncate(
            max((p for p in (run / newest / "state").rglob("*") if p.is_file()), key=file_size)
        ),
    }
    for name, cut in damage.items():
        run = tmp_path / name
        shutil.copytree(ref_dir, run)
        cut(run)
        rc, err = finish(start(run, cache, args))
        assert rc == 0, err[-2000:]
        # the warning alone: no traceback, no reports of abandoned asyncio reads
        assert len(err.splitlines()) == 1, err
        (line,) = err.splitlines()
        assert line.startswith(f"WARNING qwenvl_jax.train.loop: {run / newest}: cannot restore (")
        assert line.endswith(f"moved to {steps}.unreadable, resuming from checkpoint {every}")
        assert [r["loss"] for r in records(run)] == [r["loss"] for r in reference], name
        assert committed_checkpoints(run) == [every, steps]
        assert (run / "checkpoints" / f"{steps}.unreadable").is_dir()

    # nothing to fall back to: one line naming the folder to remove, exit status 2
    run = tmp_path / "alone"
    shutil.copytree(ref_dir, run)
    shutil.rmtree(run / "checkpoints" / str(every))
    damage["array"](run)
    rc, err = finish(start(run, cache, args))
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    (line,) = err.splitlines()
    assert line.startswith(f"qwenvl-jax train: error: {run / newest}: cannot restore (")
    assert line.endswith(f"no other checkpoint: remove {run / newest} to start afresh")
    assert committed_checkpoints(run) == [steps]


_UNAWAITED = """
import gc, inspect, warnings
warnings.simplefilter("always")
from orbax.checkpoint._src.serialization import serialization
from qwenvl_jax.train import checkpoint

checkpoint._collect_abandoned_reads()
read = serialization._read_array_index_and_device_put
params = inspect.signature(read).parameters.values()
positional = [None for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
keywords = {p.name: None for p in params if p.kind == p.KEYWORD_ONLY}
left = read(*positional, **keywords)  # created, never started


async def ours():
    pass


mine = ours()
del left, mine
gc.collect()
"""


def test_a_failed_restore_silences_only_orbax_reads_never_started():
    """A read coroutine that a failed restore created but never started warns when it is
    finalised, as late as interpreter shutdown; after a failed restore those warnings (only
    Orbax's) are dropped, so the one-line error stays one line."""
    done = subprocess.run(
        [sys.executable, "-c", _UNAWAITED], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "coroutine 'ours' was never awaited" in done.stderr
    assert "_read_array_index_and_device_put" not in done.stderr
