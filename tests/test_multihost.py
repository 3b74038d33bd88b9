"""Two processes (`jax.distributed` on this machine, one CPU device each, gloo collectives) train
one run together: each feeds its own rows and patch groups (Qwen-VL v1: its rows' pictures), the
run gives the bits of the same run on one process with two devices, checkpoints are written once,
and a run killed with SIGKILL resumes on both processes to the bits of that uninterrupted
one-process run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = [
    "--no-progress",
    "model=tiny_qwen2_5_vl",
    "stage=2",
    "data.train=synthetic",
    "data.distinct=3",
    f"steps={STEPS}",
    "batch_size=4",
    "seq_len=64",
    "checkpoint_every=2",
    "keep_checkpoints=2",
    "dtype=float32",
    "remat=none",
    "learning_rate=1e-3",
    "warmup_steps=2",
    "seed=5",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="3",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def start(workdir: Path, cache: Path, args: list[str] = ARGS) -> list[subprocess.Popen]:
    env = _env(cache)
    env.pop("XLA_FLAGS", None)  # one device a process
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qwenvl_jax.cli",
                "train",
                "--workdir",
                str(workdir),
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(2)
    ]


def one_process(workdir: Path, cache: Path, args: list[str] = ARGS) -> None:
    """The same run on one process with two devices."""
    env = dict(_env(cache), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    command = [sys.executable, "-m", "qwenvl_jax.cli", "train", "--workdir", str(workdir), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        out.append((p.returncode, err))
    return out


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                out.append(json.loads(line))
    return out


def trained(workdir: Path, step: int) -> list[np.ndarray]:
    """The train state (step, parameters, optimiser state) of checkpoint `step`, as numpy."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return jax.tree.leaves(c.restore(path, restore_args=args))


def assert_same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) > 0
    differ = sum(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert differ == 0, f"{differ} of {len(a)} arrays of the train state differ"


def losses(workdir: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in records(workdir)]


def committed(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_two_processes_train_and_resume_after_sigkill(tmp_path):
    """Two processes killed with SIGKILL mid-run resume from their last committed checkpoint and
    end with the losses and the train state, bit for bit, of the same run uninterrupted on one
    process with two devices: the rows and patch groups of the two processes make the batch of
    one process, and the resume loses nothing."""
    cache = tmp_path / "jax_cache"
    run_dir, one_dir = tmp_path / "interrupted", tmp_path / "one_process"
    one_process(one_dir, cache)
    reference = records(one_dir)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]

    procs = start(run_dir, cache)
    deadline = time.time() + 500
    # kill once step 3 is logged and a checkpoint is committed (it is written in the background)
    while len(records(run_dir)) < 3 or not committed(run_dir):
        assert all(p.poll() is None for p in procs), finish(procs)[0][1][-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)
    killed_at = len(records(run_dir))
    assert killed_at < STEPS, "the run finished before SIGKILL"
    assert committed(run_dir) and committed(run_dir)[-1] < STEPS
    assert not (run_dir / "model").exists()

    for rc, err in finish(start(run_dir, cache)):
        assert rc == 0, err[-3000:]
    resumed = records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert committed(run_dir) == [STEPS - 2, STEPS]  # written once, by both processes together
    assert (run_dir / "model" / "config.json").is_file()
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    saved = json.loads((run_dir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert len(saved["iterators"]) == 2  # each process's data iterator
    assert losses(run_dir) == losses(one_dir)
    assert_same_bits(trained(run_dir, STEPS), trained(one_dir, STEPS))


def test_two_processes_feed_their_own_pictures_qwen_vl_v1(tmp_path):
    """Qwen-VL v1's pictures are replicated, and each process reads only its own rows'
    pictures: the step gathers them into the global batch's order."""
    cache = tmp_path / "jax_cache"
    args = [a for a in ARGS if not a.startswith(("model=", "steps=", "seq_len="))]
    args += ["model=tiny_qwen_vl", "steps=2", "seq_len=300"]
    for rc, err in finish(start(tmp_path / "two", cache, args)):
        assert rc == 0, err[-3000:]
    one_process(tmp_path / "one", cache, args)
    assert len(losses(tmp_path / "two")) == 2
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    assert_same_bits(trained(tmp_path / "two", 2), trained(tmp_path / "one", 2))
