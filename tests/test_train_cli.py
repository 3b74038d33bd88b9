"""`qwenvl-jax train` end to end on a tiny checkpoint with the real Qwen tokenizer and a JSONL of
conversations with images: the data pipeline feeds the step, the run writes metrics.jsonl,
TensorBoard events, the loss plot and checkpoints, and WORKDIR/model is a checkpoint that
`from_pretrained` loads and the next stage starts from; started again, the run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qwenvl_jax as qj
from qwenvl_jax.cli import main
from tests.checkpoints import session_checkpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        pixels = rng.integers(0, 255, (56 + 28 * (i % 2), 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img{i}.png"},
                            {"type": "text", "text": f"What is shape {i}?"},
                        ],
                    },
                    {"role": "assistant", "content": f"It is shape number {i}."},
                ]
            }
        )
    (folder / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "train.jsonl"


def logged_losses(workdir) -> list[tuple[int, float]]:
    """(step, train/loss) as TensorBoard reads WORKDIR/tensorboard."""
    acc = EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


RUN = [
    "batch_size=2",
    "seq_len=128",
    "dtype=float32",
    "remat=none",
    "data.max_patches=128",
    "data.read_threads=1",
    "checkpoint_every=2",
    "--no-progress",
]


def test_train_on_jsonl_then_start_the_next_stage(tmp_path, tmp_path_factory, dataset):
    ckpt = session_checkpoint("qwen2_vl", tmp_path_factory)
    run1, run2 = tmp_path / "stage1", tmp_path / "stage2"
    assert (
        main(
            [
                "train",
                "--workdir",
                str(run1),
                f"model={ckpt}",
                "stage=1",
                f"data.train={dataset}",
                "steps=3",
                "learning_rate=1e-3",
                "warmup_steps=1",
                *RUN,
            ]
        )
        == 0
    )
    records = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "mfu"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["padding_share"] < 1
    assert records[0]["learning_rate"] == 0.0
    assert records[1]["learning_rate"] == pytest.approx(1e-3, rel=1e-6)  # warmup done
    assert len(list((run1 / "tensorboard").iterdir())) == 1
    assert logged_losses(run1) == [(r["step"], float(np.float32(r["loss"]))) for r in records]
    assert (run1 / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == ["2", "3"]

    # started again with more steps, it resumes at step 3 with the data pipeline's state
    assert (
        main(
            [
                "train",
                "--workdir",
                str(run1),
                f"model={ckpt}",
                "stage=1",
                f"data.train={dataset}",
                "steps=4",
                "learning_rate=1e-3",
                "warmup_steps=1",
                *RUN,
            ]
        )
        == 0
    )
    resumed = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[:3] == records
    assert logged_losses(run1) == [(r["step"], float(np.float32(r["loss"]))) for r in resumed]
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == ["2", "3", "4"]

    # WORKDIR/model: the LLM as it came (stage 1 freezes it), the ViT trained
    source, trained = (
        params(qj.from_pretrained(ckpt, "float32")),
        params(qj.from_pretrained(run1 / "model", "float32")),
    )
    assert set(source) == set(trained)
    for path in source:
        name = ".".join(map(str, path))
        same = source[path].tobytes() == trained[path].tobytes()
        assert same == (not name.startswith("visual.")), name
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json"):
        assert (run1 / "model" / name).read_bytes() == (ckpt / name).read_bytes()

    # stage 2 from stage 1's WORKDIR: with a zero learning rate its weights are stage 1's
    assert (
        main(
            [
                "train",
                "--workdir",
                str(run2),
                f"model={run1}",
                "stage=2",
                f"data.train={dataset}",
                "steps=1",
                "learning_rate=0",
                *RUN,
            ]
        )
        == 0
    )
    restarted = params(qj.from_pretrained(run2 / "model", "float32"))
    assert all(restarted[p].tobytes() == trained[p].tobytes() for p in trained)


@pytest.mark.parametrize("source", ["checkpoint", "preset"])
def test_a_missing_data_file_is_one_line_and_creates_nothing(
    tmp_path, tmp_path_factory, capsys, source
):
    model = session_checkpoint("qwen2_vl", tmp_path_factory) if source == "checkpoint" else None
    workdir = tmp_path / "run"
    missing = tmp_path / "nonexistent.jsonl"
    argv = ["train", "--workdir", str(workdir), f"model={model or 'tiny_qwen2_vl'}"]
    capsys.readouterr()  # what making the checkpoint printed
    assert main([*argv, "stage=1", f"data.train={missing}", "steps=1", *RUN]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qwenvl-jax train: error: ") and str(missing) in err
    if source == "checkpoint":
        assert f"data file not found: {missing}" in err
    assert not workdir.exists()
