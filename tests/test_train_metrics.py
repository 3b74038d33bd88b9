"""The run's metrics log: metrics.jsonl, the loss plot, and the TensorBoard event files, read back
with TensorBoard's own EventAccumulator (which checks each record's CRC-32C and applies the
SessionLog START purge a resumed run relies on)."""

from __future__ import annotations

import json

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from qwenvl_jax.train.metrics import MetricsLog


def scalars(logdir, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_file_holds_the_scalars(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_s": 10.0})
    log.write({"step": 2, "loss": 2.0, "learning_rate": 2e-3, "tokens_per_s": float("nan")})
    log.plot()
    log.close()
    assert [
        json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [2.5, 2.0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert events.name.startswith("events.out.tfevents.")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == [
        "train/learning_rate",
        "train/loss",
        "train/tokens_per_s",
    ]
    assert scalars(tmp_path / "tensorboard", "train/loss") == [(1, 2.5), (2, 2.0)]
    lr = scalars(tmp_path / "tensorboard", "train/learning_rate")
    assert lr == [(1, float(np.float32(1e-3))), (2, float(np.float32(2e-3)))]
    # a value that is not finite is left out of the event file (metrics.jsonl keeps it)
    assert scalars(tmp_path / "tensorboard", "train/tokens_per_s") == [(1, 10.0)]


def test_a_resumed_log_replaces_the_steps_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s), "learning_rate": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by SIGKILL
    # resumed from the checkpoint of step 3: steps 4 and 5 of the first run are dropped
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "loss": 40.0, "learning_rate": 0.25})
    log.close()
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one event file a run
    assert scalars(tmp_path / "tensorboard", "train/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    lr = scalars(tmp_path / "tensorboard", "train/learning_rate")
    assert lr == [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.25)]


def test_without_tensorboard_no_event_file(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}
