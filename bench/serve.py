"""A bounded load test of `qwenvl-jax serve`: throughput and latency at concurrency 1, 4 and 16
against sequential `qj.generate`, on loopback only, with a fixed number of requests.

The server (uvicorn on 127.0.0.1, a free port, in this process) serves the checkpoint of --model,
by default a tiny random Qwen2.5-VL written by tests/checkpoints.py. Every run sends the same
--requests greedy conversations (text of different lengths, every third one with a picture) with
max_tokens --max-tokens through the `openai` client, at most `concurrency` at a time, after a
warm-up round over the same conversations that compiles every program. Prints a markdown table:
tokens/s is the completion tokens of all requests over the wall time of the run; latency is each
request's time from send to its full answer.

    python bench/serve.py [--model PATH] [--requests 32] [--max-tokens 32] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def conversations(n: int, picture: str) -> list[list[dict]]:
    convs = []
    for i in range(n):
        text = f"Question {i}: " + "please explain this in detail. " * (1 + i % 5)
        content = [{"type": "text", "text": text}]
        if i % 3 == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": picture}})
        convs.append([{"role": "user", "content": content}])
    return convs


def as_hf(conv: list[dict]) -> list[dict]:
    out = []
    for m in conv:
        content = [
            {"type": "image", "image": c["image_url"]["url"]} if c["type"] == "image_url" else c
            for c in m["content"]
        ]
        out.append({"role": m["role"], "content": content})
    return out


def row(name: str, concurrency: int | str, latencies: list[float], tokens: int, wall: float):
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return (
        f"| {name} | {concurrency} | {len(latencies)} | {tokens} | {wall:.2f} | "
        f"{tokens / wall:.1f} | {p50:.3f} | {p90:.3f} | {p99:.3f} |"
    )


async def load_run(base: str, convs, max_tokens: int, concurrency: int):
    import openai

    gate = asyncio.Semaphore(concurrency)
    latencies, tokens = [], 0

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused") as client:

        async def one(conv):
            nonlocal tokens
            async with gate:
                start = time.perf_counter()
                r = await client.chat.completions.create(
                    model="bench", messages=conv, max_tokens=max_tokens, temperature=0
                )
                latencies.append(time.perf_counter() - start)
                tokens += r.usage.completion_tokens

        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in convs))
        return latencies, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint folder (default: a tiny random Qwen2.5-VL)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args()

    import jax
    import uvicorn

    import qwenvl_jax as qj
    from qwenvl_jax.serving.api import create_app
    from qwenvl_jax.serving.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    folder = Path(args.model) if args.model else None
    if folder is None:
        from tests.checkpoints import make_checkpoint

        folder = make_checkpoint("qwen2_5_vl", work / "tiny")
    from tests.test_generate import write_picture

    picture = write_picture(work, "picture", (100, 70), 1)
    model = qj.from_pretrained(folder, dtype="float32")
    processor = qj.Processor.from_pretrained(folder)
    convs = conversations(args.requests, picture)
    print(
        f"{jax.default_backend()} ({jax.device_count()} device), {args.requests} requests, "
        f"max_tokens {args.max_tokens}, greedy, max_batch {args.max_batch}"
    )
    header = (
        "| mode | concurrency | requests | tokens | wall s | tokens/s | p50 s | p90 s | p99 s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []

    # sequential qj.generate: warm up (compile), then time each conversation alone
    for c in convs:
        qj.generate(model, processor, as_hf(c), max_new_tokens=args.max_tokens, temperature=0)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for c in convs:
        t = time.perf_counter()
        out = qj.generate(model, processor, as_hf(c), max_new_tokens=args.max_tokens, temperature=0)
        latencies.append(time.perf_counter() - t)
        tokens += len(out.token_ids)
    rows.append(row("qj.generate, sequential", 1, latencies, tokens, time.perf_counter() - start))

    engine = Engine(model, processor, max_batch=args.max_batch, max_len=args.max_len)
    app = create_app(engine, "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        asyncio.run(load_run(base, convs, args.max_tokens, 16))  # warm-up: compile
        for concurrency in (1, 4, 16):
            latencies, tokens, wall = asyncio.run(
                load_run(base, convs, args.max_tokens, concurrency)
            )
            rows.append(row("serve", concurrency, latencies, tokens, wall))
    finally:
        server.should_exit = True
        thread.join(30)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
