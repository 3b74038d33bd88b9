"""`qwenvl-jax serve`: the OpenAI-compatible server with continuous batching.

A server runs in this process on 127.0.0.1 (uvicorn on a free port, the engine on its own thread)
over a tiny random checkpoint; requests go through the `openai` client (and httpx for the bad
ones). Every answer is compared with `qj.generate` of that conversation alone, token for token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai  # noqa: E402
import pytest
import uvicorn  # noqa: E402

import qwenvl_jax as qj
from qwenvl_jax.cli import main as cli_main
from qwenvl_jax.serving.api import Limits, create_app
from qwenvl_jax.serving.engine import Engine, wait_idle
from tests.checkpoints import session_checkpoint
from tests.test_generate import write_picture

NAME = "tiny"


@contextlib.contextmanager
def serving(model, processor, limits=None, **engine_kw):
    """A running server: yields (base URL, engine)."""
    engine = Engine(model, processor, **engine_kw)
    app = create_app(engine, NAME, limits)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def load(family, tmp_path_factory):
    return load_folder(session_checkpoint(family, tmp_path_factory))


def load_folder(folder):
    return qj.from_pretrained(folder, dtype="float32"), qj.Processor.from_pretrained(folder)


def image_part(path: str, how: str) -> dict:
    if how == "data":
        data = base64.b64encode(Path(path).read_bytes()).decode()
        url = f"data:image/png;base64,{data}"
    else:
        url = f"file://{path}" if how == "file" else path
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *images: dict) -> list[dict]:
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def as_hf(messages: list[dict], paths: dict[str, str]) -> list[dict]:
    """The same conversation in the form `qj.generate` takes (image entries by path)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": paths[c["image_url"]["url"]]}
                if c["type"] == "image_url"
                else c
                for c in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


async def ask(client, messages, *, stream: bool, **kw) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one chat completion."""
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    args = dict(model=NAME, messages=messages, extra_body=extra, **kw)
    if not stream:
        r = await client.chat.completions.create(**args)
        choice = r.choices[0]
        assert r.usage.completion_tokens == len(choice.token_ids)
        return choice.message.content, choice.token_ids, choice.finish_reason
    text, ids, reason = [], [], None
    async for chunk in await client.chat.completions.create(stream=True, **args):
        choice = chunk.choices[0]
        text.append(choice.delta.content or "")
        ids += choice.token_ids
        reason = choice.finish_reason or reason
    return "".join(text), ids, reason


def expected(model, processor, conversation, max_tokens, **kw):
    """qj.generate of the conversation alone: (the answer as the server writes it, the ids)."""
    out = qj.generate(model, processor, conversation, max_new_tokens=max_tokens, **kw)
    ids = out.token_ids
    body = ids[:-1] if ids and ids[-1] in processor.eos_token_ids else ids
    return processor.decode(body, skip_special_tokens=False), ids


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    model, processor = load("qwen2_5_vl", tmp_path_factory)
    media = tmp_path_factory.mktemp("serve_media")
    pictures = [
        write_picture(media, "a", (100, 70), 1),
        write_picture(media, "b", (60, 90), 2),
        write_picture(media, "c", (120, 120), 3),
    ]
    return model, processor, pictures


def test_concurrent_requests_each_equal_generate_alone(qwen25):
    """16 concurrent greedy requests of different lengths, with and without images (paths,
    file:// and data: URLs), some streamed, through 4 slots: each answer is qj.generate of its
    conversation alone, token for token; the programs compile once per bucket."""
    model, processor, pics = qwen25
    hows = ("path", "file", "data")
    requests, paths = [], {}
    for i in range(16):
        n_images = i % 3  # 0, 1 or 2 images
        parts = [image_part(pics[(i + k) % 3], hows[(i + k) % 3]) for k in range(n_images)]
        for k, part in enumerate(parts):
            paths[part["image_url"]["url"]] = pics[(i + k) % 3]
        text = f"Request {i}: " + "tell me more. " * (1 + 3 * (i % 4))
        requests.append((user(text, *parts), 3 + (i * 7) % 29, i % 3 == 1))
    greedy = dict(temperature=0)

    async def run_all(base):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
            return await asyncio.gather(
                *(
                    ask(client, msgs, stream=stream, max_tokens=n, **greedy)
                    for msgs, n, stream in requests
                )
            )

    with serving(model, processor, max_batch=4, max_len=192) as (base, engine):
        answers = asyncio.run(run_all(base))
        compiled = dict(engine.compiles)
        assert compiled["_decode_rows"] == 1
        assert engine.stats["decode_steps"] < sum(n for _, n, _ in requests)  # rows shared steps
        answers_again = asyncio.run(run_all(base))  # the same shapes: nothing compiles
        assert dict(engine.compiles) == compiled
        health = httpx.get(f"{base}/health").json()
        assert health["status"] == "ok" and health["running"] == 0
        cards = httpx.get(f"{base}/v1/models").json()["data"]
        assert [c["id"] for c in cards] == [NAME]
    assert answers_again == answers
    for (msgs, n, _), (text, ids, reason) in zip(requests, answers):
        want_text, want_ids = expected(model, processor, as_hf(msgs, paths), n, **greedy)
        assert ids == want_ids
        assert text == want_text
        assert reason == ("stop" if ids[-1] in processor.eos_token_ids else "length")
        assert len(ids) == n or reason == "stop"


def test_ring_wraps_and_stop_strings(qwen25):
    """More decode steps than a row has slots (the ring wraps), a stop string, and a seeded
    sampled request equal to qj.generate with the same seed."""
    model, processor, _ = qwen25
    convs = [user(f"Story {i}. " + "Go on. " * i) for i in range(6)]
    greedy = dict(temperature=0)

    async def run_all(base):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
            plain = await asyncio.gather(
                *(ask(client, c, stream=False, max_tokens=30, **greedy) for c in convs)
            )
            sampled = await ask(
                client,
                convs[0],
                stream=True,
                max_tokens=12,
                temperature=0.9,
                top_p=0.8,
                seed=7,
                extra_body={"top_k": 40},
            )
            return plain, sampled

    with serving(model, processor, max_batch=2, max_len=96) as (base, engine):
        plain, sampled = asyncio.run(run_all(base))
        assert engine.stats["decode_steps"] > engine.max_len  # the write slot went round
        ref_text, ref_ids = expected(model, processor, convs[2], 30, **greedy)
        stop = ref_text[10:14]
        cut = ref_text.index(stop)

        async def stopped():
            async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
                return await asyncio.gather(
                    ask(client, convs[2], stream=False, max_tokens=30, stop=[stop], **greedy),
                    ask(client, convs[2], stream=True, max_tokens=30, stop=stop, **greedy),
                )

        for text, _, reason in asyncio.run(stopped()):
            assert (text, reason) == (ref_text[:cut], "stop")
    for c, (text, ids, _) in zip(convs, plain):
        assert (text, ids) == expected(model, processor, c, 30, **greedy)
    want = expected(model, processor, convs[0], 12, temperature=0.9, top_p=0.8, top_k=40, seed=7)
    assert sampled[:2] == want
    assert want[1] != expected(model, processor, convs[0], 12, **greedy)[1]


@pytest.mark.parametrize("family", ["qwen3_vl_moe"])
def test_another_family(family, tmp_path_factory):
    """A mixture-of-experts Qwen3-VL model with DeepStack: images and text, streamed or not."""
    model, processor = load(family, tmp_path_factory)
    media = tmp_path_factory.mktemp(f"serve_{family}")
    pic = write_picture(media, "p", (256, 256), 5)
    convs = [
        user("Describe this picture.", image_part(pic, "path")),
        user("Hello! " * 5),
        [
            {"role": "system", "content": "Be brief."},
            *user("What is this?", image_part(pic, "data")),
        ],
    ]
    paths = {image_part(pic, h)["image_url"]["url"]: pic for h in ("path", "data")}

    async def run_all(base):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
            return await asyncio.gather(
                *(
                    ask(client, c, stream=i == 1, max_tokens=10 + 4 * i, temperature=0)
                    for i, c in enumerate(convs)
                )
            )

    with serving(model, processor, max_batch=2, max_len=512) as (base, _):
        answers = asyncio.run(run_all(base))
    for i, (c, (text, ids, _)) in enumerate(zip(convs, answers)):
        want = expected(model, processor, as_hf(c, paths), 10 + 4 * i, temperature=0)
        assert (text, ids) == want


@pytest.fixture(scope="module", params=["qwen3_5"])
def hybrid(request, tmp_path_factory):
    """A tiny Qwen3.5 checkpoint: Gated DeltaNet and gated attention layers, with the real Qwen
    vocabulary and the processor files of Qwen3-VL (whose processor Qwen3.5 ships), pictures
    kept small (a few image tokens: every prompt fits one bucket)."""
    folder = session_checkpoint(
        request.param,
        tmp_path_factory,
        reference="Qwen__Qwen3-VL-4B-Instruct",
        preprocessor={"size": {"shortest_edge": 64 * 64, "longest_edge": 16777216}},
    )
    model, processor = load_folder(folder)
    pic = write_picture(tmp_path_factory.mktemp(f"serve_{request.param}"), "p", (96, 64), 4)
    return model, processor, pic


def test_hybrid_requests_each_equal_generate_alone(hybrid):
    """Qwen3.5: 10 concurrent greedy requests of different lengths (3 with an image) through 2
    slots, for more decode steps than a row has slots: each answer is qj.generate of its
    conversation alone, token for token. Each row's linear-attention states (conv inputs and
    delta-rule state) are its request's: a reused slot starts from zero, the other rows and the
    attention ring wrapping around do not reach them, and the steps a slot sits empty leave them
    as they are."""
    model, processor, pic = hybrid
    requests, paths = [], {}
    for i in range(10):
        parts = [image_part(pic, "path")] if i % 4 == 1 else []
        paths.update({p["image_url"]["url"]: pic for p in parts})
        text = f"Request {i}: " + "go on. " * (1 + 2 * (i % 3))
        requests.append((user(text, *parts), 16 + (i * 5) % 17, i % 3 == 2))

    async def run_all(base, batch):
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:
            return await asyncio.gather(
                *(
                    ask(client, msgs, stream=stream, max_tokens=n, temperature=0)
                    for msgs, n, stream in batch
                )
            )

    def states(engine):
        assert wait_idle(engine)
        return [np.asarray(a) for a in (engine._cache.conv, engine._cache.recurrent)]

    with serving(model, processor, max_batch=2, max_len=96) as (base, engine):
        answers = asyncio.run(run_all(base, requests))
        assert engine.stats["decode_steps"] > engine.max_len  # the write slot went round
        assert engine.stats["prefills"] == len(requests)
        before, steps = states(engine), engine.stats["decode_steps"]
        # alone in slot 0: slot 1 sits empty through its decode steps
        [again] = asyncio.run(run_all(base, requests[1:2]))
        after = states(engine)
        assert engine.stats["decode_steps"] - steps == len(again[1]) - 1
    assert again == answers[1]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[:, 1], b[:, 1])
        assert not np.array_equal(a[:, 0], b[:, 0])
    for (msgs, n, _), (text, ids, _) in zip(requests, answers):
        want_text, want_ids = expected(model, processor, as_hf(msgs, paths), n, temperature=0)
        assert ids == want_ids
        assert text == want_text
        assert len(ids) == n or ids[-1] in processor.eos_token_ids
    assert len({tuple(ids) for _, ids, _ in answers}) == len(answers)


def test_bad_requests_get_4xx_and_the_server_goes_on(qwen25, tmp_path):
    model, processor, pics = qwen25
    good = {"model": NAME, "messages": user("Hi"), "max_tokens": 3, "temperature": 0}
    huge = write_picture(tmp_path, "huge", (3000, 2000), 9)
    cases = [
        (b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
        ({**good, "model": "gpt-4"}, 404, "not found"),
        ({**good, "messages": user("Hi", image_part("/no/such.png", "path"))}, 400, "not found"),
        ({**good, "messages": user("x " * 400)}, 400, "--max-len"),
        ({**good, "max_tokens": 10_000}, 400, "max_tokens 10000 is too large"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "temperature": -1}, 400, "temperature"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "n": 2}, 400, "n must be 1"),
        ({**good, "messages": "Hi"}, 400, "messages"),
        ({**good, "messages": [{"role": "robot", "content": "Hi"}]}, 400, "role"),
        ({k: v for k, v in good.items() if k != "messages"}, 400, "messages is required"),
        ({**good, "messages": user("Hi", image_part("http://x/y.png", "path"))}, 400, "URLs"),
        ({**good, "messages": user("Hi", *[image_part(pics[0], "path")] * 9)}, 400, "images"),
        ({**good, "messages": user("Hi", image_part(huge, "path"))}, 400, "pixels"),
        ({**good, "messages": user("Hi", {"type": "audio"})}, 400, "unsupported part"),
        (
            {**good, "messages": user("Hi", {"type": "image_url", "image_url": {"url": "data:"}})},
            400,
            "data:",
        ),
    ]
    limits = Limits(max_image_pixels=4_000_000)
    with (
        serving(model, processor, limits, max_batch=1, max_len=256, max_queue=0) as (base, engine),
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        for body, status, words in cases:
            if isinstance(body, bytes):
                r = http.post("/v1/chat/completions", content=body)
            else:
                r = http.post("/v1/chat/completions", json=body)
            message = r.json()["error"]["message"]
            assert (r.status_code, words in message) == (status, True), (body, message)
            assert "\n" not in message
        r = http.post("/v1/chat/completions", json=good)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

        # the one slot busy and no queue: 429; a client that goes away frees its slot
        long = {**good, "max_tokens": 190, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=long) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            busy = http.post("/v1/chat/completions", json=good)
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
        end = time.monotonic() + 30  # the stream's request may still wait in the queue
        while (engine.load()["running"] or engine.load()["queued"]) and time.monotonic() < end:
            time.sleep(0.05)
        assert engine.load()["running"] == engine.load()["queued"] == 0
        assert engine.stats["finished"] == 1  # the streamed request was dropped, not run out
        r = http.post("/v1/chat/completions", json=good)
        assert r.status_code == 200


def test_cli_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert cli_main(["serve", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint folder not found" in err
