"""`qwenvl-jax demo`: the synthetic scenes and their questions, the demo's own vocabulary and
checkpoint, the scoring, and a shortened demo end to end (every output file, then `generate
--model WORKDIR/model` answering from the trained model). The accuracy thresholds are checked by
the full demo (the README's table), not here: a shortened run trains for a few steps only."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageFont

import qwenvl_jax as qj
from qwenvl_jax.cli import main
from qwenvl_jax.demo.evaluate import (
    GAP,
    TILE,
    demo_font,
    draw_predictions,
    format_table,
    iou,
    layout,
    place_tag,
    score,
    summarise,
    wrap,
)
from qwenvl_jax.demo.evaluate import TASKS as ASKED
from qwenvl_jax.demo.hf_tokenizer import write_tokenizer_files
from qwenvl_jax.demo.model import DemoModelSize, hf_config, write_initial_checkpoint
from qwenvl_jax.demo.shapes import COLOURS, OUTLINE, make_scene, questions, write_split
from qwenvl_jax.demo.vocab import train_vocab, write_tiktoken
from qwenvl_jax.grounding import format_box
from qwenvl_jax.processing.qwen_vl_v1 import PAT_STR, QwenTokenizer

SCALE = 0.01  # 40 training scenes, 1 + 6 + 3 training steps


# ------------------------------------------------------------------------------ the task


def test_scenes_are_seeded_on_the_grid_and_questions_are_unambiguous():
    for seed in range(40):
        a = make_scene(np.random.default_rng(seed))
        b = make_scene(np.random.default_rng(seed))
        assert a.shapes == b.shapes
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        pixels = np.asarray(a.image)
        for s in a.shapes:
            x1, y1, x2, y2 = s.box
            assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112 and x2 - x1 == y2 - y1
            assert all(v % 14 == 0 for v in s.box)  # the 14 px patch grid
            # the shape's colour is drawn at its centre
            centre = pixels[(y1 + 2 * y2) // 3, (x1 + x2) // 2]
            assert tuple(centre) == COLOURS[s.colour]
            assert tuple(pixels[y2 - 1, (x1 + x2) // 2]) == OUTLINE  # the base's edge
        for i, s in enumerate(a.shapes):
            for t in a.shapes[i + 1 :]:
                assert (s.kind, s.colour) != (t.kind, t.colour)
                assert max(s.box[0], t.box[0]) >= min(s.box[2], t.box[2]) or (
                    max(s.box[1], t.box[1]) >= min(s.box[3], t.box[3])
                )
        items = questions(a, np.random.default_rng(seed))
        assert {"count", "caption", "list", "ground"} <= {item["task"] for item in items}
        for item in items:
            if item["task"] == "colour":
                kind = item["q"].split()[-1].rstrip("?")
                (only,) = [s for s in a.shapes if s.kind == kind]
                assert item["a"] == only.colour
            elif item["task"] == "shape":
                colour = item["q"].split()[-2]
                (only,) = [s for s in a.shapes if s.colour == colour]
                assert item["a"] == only.kind
            elif item["task"] == "count":
                assert item["a"] == ("zero", "one", "two", "three")[len(a.shapes)]
            elif item["task"] == "position":
                first, second = (
                    s
                    for name in item["q"][3:-1].split(" left or right of ")
                    for s in a.shapes
                    if s.name == name
                )
                assert abs(first.cx - second.cx) >= 14
                assert item["a"] == ("left" if first.cx < second.cx else "right")
            elif item["task"] == "ground":
                (named,) = [s for s in a.shapes if s.name == item["a"]]
                assert tuple(item["box"]) == named.box
            elif item["task"] == "list":  # every shape once, kind before colour
                listed = sorted(item["a"].rstrip(".").split(", "))
                assert listed == sorted(f"{s.kind} {s.colour}" for s in a.shapes)


def test_split_conversations_hold_every_question_once(tmp_path):
    jsonl = write_split(tmp_path / "split", 6, seed=3, per_conversation=0)
    scenes = json.loads((tmp_path / "split" / "scenes.json").read_text())
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == len(scenes) == 6
    for line, scene in zip(lines, scenes):
        messages = line["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(scene["items"])
        assert messages[0]["content"][0] == {"type": "image", "image": scene["image"]}
        asked = sorted(m["content"][-1]["text"] for m in messages[::2])
        assert asked == sorted(item["q"] for item in scene["items"])
        assert (tmp_path / "split" / scene["image"]).is_file()
    per_question = write_split(tmp_path / "single", 6, seed=3)  # the default: one a line
    lines = per_question.read_text().splitlines()
    assert len(lines) == sum(len(s["items"]) for s in scenes)
    assert all(len(json.loads(line)["messages"]) == 2 for line in lines)


def test_split_keeps_the_tasks_asked_for(tmp_path):
    from qwenvl_jax.errors import ConfigError

    write_split(tmp_path / "some", 5, seed=4, per_conversation=0, tasks=("colour", "list"))
    scenes = json.loads((tmp_path / "some" / "scenes.json").read_text())
    tasks = {item["task"] for scene in scenes for item in scene["items"]}
    assert "list" in tasks and tasks <= {"colour", "list"}
    with pytest.raises(ConfigError, match="unknown demo task 'colours'"):
        write_split(tmp_path / "bad", 2, seed=4, tasks=("colours",))


def test_split_repeats_weight_tasks_without_changing_the_scenes(tmp_path):
    from qwenvl_jax.errors import ConfigError

    once = write_split(tmp_path / "once", 6, seed=5)
    twice = write_split(tmp_path / "twice", 6, seed=5, repeat={"colour": 2})
    assert (tmp_path / "once" / "scenes.json").read_text() == (
        tmp_path / "twice" / "scenes.json"
    ).read_text()
    a, b = (
        Counter(json.loads(line)["tasks"][0] for line in path.read_text().splitlines())
        for path in (once, twice)
    )
    assert a["colour"] > 0 and b["colour"] == 2 * a["colour"]
    assert {t: n for t, n in b.items() if t != "colour"} == {
        t: n for t, n in a.items() if t != "colour"
    }
    with pytest.raises(ConfigError, match="repeat.colour must be an integer >= 1"):
        write_split(tmp_path / "bad", 2, seed=5, repeat={"colour": 0})
    with pytest.raises(ConfigError, match="unknown demo task 'colours'"):
        write_split(tmp_path / "bad", 2, seed=5, repeat={"colours": 2})


# ------------------------------------------------------------------------------ vocabulary, model


def test_vocabulary_and_checkpoint_follow_the_qwen_vl_layout(tmp_path):
    texts = ["What colour is the circle?", "the red circle", "a blue square and a red circle."]
    ranks = train_vocab(texts * 3, 300)
    assert 256 < len(ranks) <= 300 and sorted(ranks.values()) == list(range(len(ranks)))
    write_tiktoken(ranks, tmp_path / "qwen.tiktoken")
    tok = QwenTokenizer(tmp_path / "qwen.tiktoken", image_span=16)
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2
    config = hf_config(DemoModelSize(), len(ranks))
    assert config["visual"]["image_start_id"] == tok.img_start_id
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= tok.vocab_size

    size = DemoModelSize(vocab_ranks=300)
    folder = write_initial_checkpoint(tmp_path / "init", size, texts * 3)
    processor = qj.Processor.from_pretrained(folder)
    model = qj.from_pretrained(folder, dtype="float32")
    assert model.config.vision.n_queries == 16 and model.config.vision.image_size == 112
    image = Image.new("RGB", (112, 112), (200, 200, 200))
    inputs = processor(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": texts[0]}],
            }
        ]
    )
    assert inputs["pixel_values"].shape == (1, 3, 112, 112)
    ids = inputs["input_ids"][0]
    start = int(np.flatnonzero(ids == config["visual"]["image_start_id"])[0])
    assert ids[start + 17] == tok.img_end_id  # <img> + 16 positions + </img>
    logits = model(**inputs)
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert np.isfinite(np.asarray(logits)).all()


def test_vocabulary_is_the_bpe_trainers_merges_as_tiktoken_ranks(tmp_path):
    import subprocess
    import sys

    from tokenizers import Tokenizer

    texts = ["the café is open", "a café, a caffè", "What colour is the circle?"] * 4
    ranks = train_vocab(texts, 300)
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    # each merged token joins two tokens of lower rank; bytes, not ByteLevel's characters
    for token, rank in ranks.items():
        if rank >= 256:
            assert any(
                ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                for i in range(1, len(token))
            ), token
    assert " café".encode() in ranks and "Ã©".encode() not in ranks
    # the same texts, the same ranks, in this process and in another one
    assert train_vocab(texts, 300) == ranks
    code = (
        "from qwenvl_jax.demo.vocab import train_vocab; "
        f"print(sorted(train_vocab({texts!r}, 300).items(), key=lambda kv: kv[1]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert other.strip() == repr(sorted(ranks.items(), key=lambda kv: kv[1]))
    # max_size caps the ranks
    assert len(train_vocab(texts, 260)) == 260
    # qwen.tiktoken and the tokenizer.json made from the same ranks split texts alike
    write_tiktoken(ranks, tmp_path / "qwen.tiktoken")
    write_tokenizer_files(ranks, tmp_path, PAT_STR)
    tiktoken_ids = QwenTokenizer(tmp_path / "qwen.tiktoken", image_span=16)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*texts, "the caffè is a café", "Où est le cercle?"]:
        assert hf.encode(text).ids == tiktoken_ids.encode(text), text


def test_qwen_vl_resampler_starts_local(tmp_path):
    """With the queries tiling the patches (4x4 of 28 px at 112 px), resampler query i starts out
    reading patch i, and a patch's position code is a row code plus a column code."""
    import jax.numpy as jnp

    from qwenvl_jax.models.v1_vision import bicubic_resize

    size = DemoModelSize(vocab_ranks=280, patch_size=28)
    folder = write_initial_checkpoint(tmp_path / "init", size, ["a red circle."] * 3)
    v = qj.from_pretrained(folder, dtype="float32").visual
    pixels = np.random.default_rng(0).normal(size=(3, 3, 112, 112)).astype(np.float32)
    x = v.ln_pre(
        v.conv1(v.patchify(jnp.asarray(pixels))) + bicubic_resize(v.positional_embedding[...], 16)
    )
    for block in v.resblocks:
        x = block(x)
    r = v.attn_pool
    pos = r.pos_embed[...]
    q = r.attn.q_proj(r.ln_q(r.query[...]) + pos)
    k = r.attn.k_proj(r.ln_kv(r.kv_proj(x)) + bicubic_resize(pos, 16))
    attn = np.asarray(jax.nn.softmax(jnp.einsum("qd,nkd->nqk", q, k) / np.sqrt(q.shape[-1])))
    assert np.diagonal(attn, axis1=1, axis2=2).min() > 0.9
    table = np.asarray(bicubic_resize(v.positional_embedding[...], 16)).reshape(4, 4, -1)
    additive = table[:, :1] + table[:1, :] - table[:1, :1]  # row r's code + column c's code
    np.testing.assert_allclose(table, additive, atol=1e-5)
    assert (
        np.linalg.norm(table[0, 0] - table[0, 1]) > 1
        and np.linalg.norm(table[0, 0] - table[1, 0]) > 1
    )


# ------------------------------------------------------------------------------ scoring


def test_scoring():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    item = {
        "task": "ground",
        "q": "Where is the red circle?",
        "a": "the red circle",
        "box": [14, 28, 56, 70],
    }
    exact = format_box("the red circle", item["box"], "qwen_vl", (112, 112))
    assert score(item, exact, (112, 112))["iou"] > 0.95
    other = format_box("the blue square", [70, 70, 112, 112], "qwen_vl", (112, 112))
    assert score(item, other + exact, (112, 112))["iou"] > 0.95  # the box named like the shape
    assert score(item, "somewhere", (112, 112)) == {
        "answer": "somewhere",
        "box": None,
        "iou": 0.0,
        "correct": False,
    }
    colour = {"task": "colour", "q": "What colour is the circle?", "a": "red"}
    assert score(colour, " Red.", (112, 112))["correct"]
    assert not score(colour, "blue", (112, 112))["correct"]
    records = [
        {"item": colour, "correct": True},
        {"item": colour, "correct": False},
        {"item": {**colour, "task": "shape"}, "correct": True},
        {"item": item, "correct": True, "iou": 0.8},
        {"item": item, "correct": False, "iou": 0.2},
    ]
    out = summarise(records)
    assert out["colour_accuracy"] == 0.5 and out["shape_accuracy"] == 1.0
    assert out["vqa_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["grounding_miou"] == 0.5 and out["count_accuracy"] is None
    assert "| grounding | 2 | mean IoU | 0.500 |" in format_table(out)


def test_picture_takes_boxes_written_the_wrong_way_round(tmp_path):
    """A model may write the bottom-right corner first: that box scores IoU 0, and the picture
    still draws it."""
    write_split(tmp_path / "split", 2, seed=1)
    scene = json.loads((tmp_path / "split" / "scenes.json").read_text())[0]
    item = next(i for i in scene["items"] if i["task"] == "ground")
    x1, y1, x2, y2 = item["box"]
    ref = format_box(item["a"], item["box"], "qwen_vl", (112, 112)).split("<box>")[0]
    answer = (
        ref + f"<box>({x2 * 1000 // 112},{y2 * 1000 // 112}),"
        f"({x1 * 1000 // 112},{y1 * 1000 // 112})</box>"
    )
    result = score(item, answer, (112, 112))
    assert result["box"] is not None and result["iou"] == 0.0 and not result["correct"]
    draw_predictions(
        [{"scene": 0, "item": item, **result}], tmp_path / "split", tmp_path / "predictions.png"
    )
    assert Image.open(tmp_path / "predictions.png").size[0] > 0


def _picture_records(tmp_path) -> tuple[list[dict], Path]:
    """Held-out records with every kind of trouble for the picture: long wrong answers, a
    missing box, boxes sharing a corner, boxes beyond the image."""
    split = tmp_path / "split"
    write_split(split, 6, seed=2)
    scenes = json.loads((split / "scenes.json").read_text())
    records = []
    for k, scene in enumerate(scenes):
        for n, item in enumerate(i for i in scene["items"] if i["task"] in ASKED):
            if item["task"] == "ground":
                box = [[0, 0, 28, 28], [0, 0, 56, 56], [90, 90, 130, 140], item["box"]][n % 4]
                answer = "" if k == 1 else format_box(item["a"], box, "qwen_vl", (112, 112))
            elif n % 3 == 0:
                answer = "a " + "very " * 30 + "long answer and " + "x" * 80
            else:
                answer = item["a"]
            records.append({"scene": k, "item": item, **score(item, answer, (112, 112))})
    return records, split


def test_picture_text_stays_inside_its_panel(tmp_path):
    font = demo_font()
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert Path(font.path).name == "DejaVuSans.ttf"

    text = "What colour is the square? \u2192\u00a0purple " + "y" * 90
    lines = wrap(text, font, 100)
    assert all(font.getlength(line) <= 100 for line in lines) and len(lines) > 3
    assert any("\u2192\u00a0purple" in line for line in lines)  # kept at the no-break space
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")  # nothing lost

    records, split = _picture_records(tmp_path)
    (width, height), legend, panels = layout(records, font, n_images=6, columns=4)
    assert len(panels) == 6 and width == 4 * TILE + 5 * GAP
    sheet = (0, 0, width, height)
    for label in legend:
        assert _inside(label.box, (GAP, GAP, width - GAP, panels[0].image[1]))
    for p in panels:
        assert _inside(p.bounds, sheet)
        assert not any(_overlap(p.bounds, q.bounds) for q in panels if q is not p)
        lines = [label for label in p.labels if label.background is None]
        tags = [label for label in p.labels if label.background is not None]
        scene_records = [r for r in records if r["scene"] == p.scene]
        asked = {r["item"]["task"] for r in scene_records}
        assert len(lines) >= len(scene_records) and asked
        for label in lines:
            assert _inside(label.box, p.text) and font.getlength(label.text) <= TILE - 12
        boxed = sum(r["item"]["task"] == "ground" and r["box"] is not None for r in scene_records)
        assert len(tags) == boxed
        for label in tags:
            assert _inside(label.outer, p.image)
        for a, b in itertools.combinations(p.labels, 2):
            assert not _overlap(a.outer, b.outer), (a.text, b.text)
        for box, _, _ in p.boxes:
            assert _inside(box, p.image)
    # wrong answers are red and marked, and the lines tell all of a panel's answers
    wrong = next(r for r in records if not r["correct"] and r["item"]["task"] != "ground")
    text = " ".join(label.text for p in panels if p.scene == wrong["scene"] for label in p.labels)
    assert f"{wrong['item']['q']} \u2192" in text and "\u2717" in text
    # five tags clear of each other around one corner
    taken = []
    for n in range(5):
        taken.append(place_tag(font, str(n), (10, 10, 40, 40), (0, 0, 224, 224), taken).outer)
    assert all(_inside(t, (0, 0, 224, 224)) for t in taken)
    assert not any(_overlap(a, b) for a, b in itertools.combinations(taken, 2))

    draw_predictions(records, split, tmp_path / "predictions.png", n_images=6)
    with Image.open(tmp_path / "predictions.png") as picture:
        assert picture.size == (width, height)


def _inside(box, area) -> bool:
    return area[0] <= box[0] and area[1] <= box[1] and box[2] <= area[2] and box[3] <= area[3]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("demo") / "work"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["demo", "--workdir", str(work), "--scale", str(SCALE), "--no-progress"])
    assert status == 0
    return work, out.getvalue()


def test_shortened_demo_writes_every_output(demo):
    work, printed = demo
    results = json.loads((work / "results.json").read_text())
    for key in ("vqa_accuracy", "grounding_miou", "count_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["minutes"] > 0 and results["family"] == "qwen_vl"
    # results.json is the summary of the per-question predictions
    records = [json.loads(line) for line in (work / "predictions.jsonl").read_text().splitlines()]
    scenes = json.loads((work / "data" / "heldout" / "scenes.json").read_text())
    # every held-out question of an asked task (not the shape lists, a training task)
    assert len(records) == sum(item["task"] in ASKED for s in scenes for item in s["items"])
    assert {k: results[k] for k in summarise(records)} == summarise(records)
    assert format_table(results).splitlines()[2] in printed
    # the picture: a grid of 224 px tiles with text below, four a row
    with Image.open(work / "predictions.png") as picture:
        assert picture.format == "PNG" and picture.size[0] == 4 * TILE + 5 * GAP
    # the three stages ran with the real training code, each from the previous stage's model
    for stage in (1, 2, 3):
        config = json.loads((work / f"stage{stage}" / "train_config.json").read_text())
        assert config["stage"] == stage
        previous = work / ("init" if stage == 1 else f"stage{stage - 1}/model")
        assert Path(config["model"]) == previous
        assert (work / f"stage{stage}" / "metrics.jsonl").read_text().strip()
    assert json.loads((work / "stage1" / "train_config.json").read_text())["freeze"][-1] == [
        "(language_model|lm_head)\\..*",
        "freeze",
    ]
    # WORKDIR/model is the last stage's model
    assert sorted(p.name for p in (work / "model").iterdir()) == sorted(
        p.name for p in (work / "stage3" / "model").iterdir()
    )


def test_demo_keeps_the_resampler_reading_its_own_cell(demo):
    # the demo's freeze rows hold the resampler's query/key path at its local start through
    # the three stages, while its values and the rest of the adapter train
    from qwenvl_jax.modeling import from_pretrained

    work, _ = demo
    start = from_pretrained(work / "init", dtype="float32").visual.attn_pool
    end = from_pretrained(work / "model", dtype="float32").visual.attn_pool
    for part in ("attn.q_proj.kernel", "attn.k_proj.kernel", "ln_q.weight", "ln_kv.weight"):
        a, b = start, end
        for name in part.split("."):
            a, b = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=part)
    assert not np.array_equal(
        np.asarray(start.attn.v_proj.kernel[...]), np.asarray(end.attn.v_proj.kernel[...])
    )


def test_generate_answers_from_the_demo_model(demo, capsys):
    work, _ = demo
    model_dir = work / "model"
    scene = json.loads((work / "data" / "heldout" / "scenes.json").read_text())[0]
    image = str(work / "data" / "heldout" / scene["image"])
    question = scene["items"][0]["q"]
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--image",
                image,
                "--prompt",
                question,
                "--max-new-tokens",
                "12",
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["prompt_tokens"] > 16 and 1 <= len(answer["token_ids"]) <= 12
    # the same answer as the library gives for the same conversation
    model = qj.from_pretrained(model_dir, dtype="float32")
    processor = qj.Processor.from_pretrained(model_dir)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
        }
    ]
    expected = qj.generate(model, processor, messages, max_new_tokens=12)
    assert answer["token_ids"] == expected.token_ids and answer["text"] == expected.text


def test_demo_refuses_a_workdir_of_other_settings(demo, capsys):
    work, _ = demo
    capsys.readouterr()
    assert main(["demo", "--workdir", str(work), "--scale", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (scale)" in err
