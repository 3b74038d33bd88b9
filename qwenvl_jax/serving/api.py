"""The OpenAI-compatible HTTP layer (FastAPI): `POST /v1/chat/completions` (plain or streamed as
server-sent events), `GET /v1/models`, `GET /health`.

Handlers run on the event loop; the host work of a request (reading its images, the processor)
runs in a worker thread, and the device work on the engine's thread (`Engine`), which hands back
events through an asyncio queue. Every limit answers with an OpenAI-style error object: a bad
request 400 (404 for an unknown model, 413 for a body too large), a full queue 429, an engine
that is not running 503; anything unexpected is a 500 with one line, and the server keeps
serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwenvl_jax.errors import InputError, QwenVLError
from qwenvl_jax.serving.engine import Engine, Event, Overloaded, Unavailable
from qwenvl_jax.serving.engine import Request as EngineRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request: body bytes, images and videos per request, bytes and pixels of
    one image, stop strings."""

    max_body_bytes: int = 64 * 2**20
    max_images: int = 8
    max_videos: int = 2
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_stop: int = 4


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    message = " ".join(str(message).split())  # one line
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


# ------------------------------------------------------------------------------ request parsing


def _number(body: Mapping, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value):
        raise InputError(f"{name} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _media_path(url: str, what: str) -> str:
    if url.startswith(("http://", "https://")):
        raise InputError(f"{what} URLs are not fetched: give a file path, file:// or data: URL")
    return url[len("file://") :] if url.startswith("file://") else url


def _load_image(url: Any, limits: Limits) -> Any:
    """The image of an `image_url` part as uint8[H, W, 3], within the size limits."""
    import PIL.Image

    from qwenvl_jax.processing.image import load_image

    if not isinstance(url, str) or not url:
        raise InputError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.startswith("data:image/") or ";base64" not in head:
            raise InputError("data: image URLs must be data:image/...;base64,...")
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise InputError(f"an image is larger than {limits.max_image_bytes} bytes")
        try:
            probe: Any = io.BytesIO(base64.b64decode(data, validate=True))
        except ValueError as e:
            raise InputError(f"cannot decode base64 image: {e}") from None
        source, name = url, "given as base64 data"
    else:
        source = _media_path(url, "image")
        if not os.path.isfile(source):
            raise InputError(f"image file not found: {source}")
        if os.path.getsize(source) > limits.max_image_bytes:
            raise InputError(f"image {source} is larger than {limits.max_image_bytes} bytes")
        probe, name = source, source
    try:
        with PIL.Image.open(probe) as header:  # reads the header only
            w, h = header.size
    except Exception as e:
        raise InputError(f"cannot read image {name}: {e}") from None
    if w * h > limits.max_image_pixels:
        raise InputError(f"image {name} has {w}x{h} pixels, more than {limits.max_image_pixels}")
    return load_image(source)


def parse_messages(messages: Any, limits: Limits) -> list[dict]:
    """OpenAI chat messages -> one conversation in the Hugging Face chat format, images read.
    Text parts stay text; `image_url` parts (file paths, file:// or base64 data: URLs) become
    image entries; `video` / `video_url` parts (file paths) video entries."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    conversation, images, videos = [], 0, 0
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}] must be an object with role system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            conversation.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"{where}.text must be a string")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                images += 1
                if images > limits.max_images:
                    raise InputError(f"more than {limits.max_images} images in one request")
                value = part.get(kind)
                url = value.get("url") if isinstance(value, Mapping) else value
                parts.append({"type": "image", "image": _load_image(url, limits)})
            elif kind in ("video_url", "video"):
                videos += 1
                if videos > limits.max_videos:
                    raise InputError(f"more than {limits.max_videos} videos in one request")
                value = part.get(kind)
                url = value.get("url") if isinstance(value, Mapping) else value
                if not isinstance(url, str) or not url:
                    raise InputError(f"{where} must name a video file")
                path = _media_path(url, "video")
                if not os.path.isfile(path):
                    raise InputError(f"video file not found: {path}")
                parts.append({"type": "video", "video": path})
            else:
                raise InputError(f"{where}: unsupported part type {kind!r}")
        conversation.append({"role": m["role"], "content": parts})
    return conversation


@dataclasses.dataclass
class Parsed:
    conversation: list
    max_tokens: int | None
    sampling: dict
    stop: list[str]
    stream: bool
    include_usage: bool
    token_ids: bool


def parse_body(body: Any, model_name: str, limits: Limits) -> Parsed:
    """The chat-completion request body (its JSON, parsed), checked; images are read later."""
    if not isinstance(body, Mapping):
        raise InputError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise HTTPError(404, f"model {model!r} not found; this server serves {model_name!r}")
    if _number(body, "n", int, 1) != 1:
        raise InputError("n must be 1")
    max_tokens = _number(body, "max_completion_tokens", int, None)
    max_tokens = _number(body, "max_tokens", int, max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InputError("stop must be a string or a list of non-empty strings")
    if len(stop) > limits.max_stop:
        raise InputError(f"at most {limits.max_stop} stop strings")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise InputError("stream_options must be an object")
    sampling = dict(
        temperature=_number(body, "temperature", float),
        top_p=_number(body, "top_p", float),
        top_k=_number(body, "top_k", int),
        repetition_penalty=_number(body, "repetition_penalty", float),
        seed=_number(body, "seed", int),
    )
    if sampling["top_k"] is not None and sampling["top_k"] < 0:
        sampling["top_k"] = 0  # vLLM's -1: off
    if "messages" not in body:
        raise InputError("messages is required")
    return Parsed(
        body["messages"],
        max_tokens,
        sampling,
        list(stop),
        bool(body.get("stream", False)),
        bool(options.get("include_usage", False)),
        bool(body.get("return_token_ids", False)),
    )


# ------------------------------------------------------------------------------ the app


def create_app(engine: Engine, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The ASGI app over a (not yet started) engine: it starts and stops with the app."""
    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="qwenvl_jax", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", **engine.load()})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "qwenvl_jax",
            "max_model_len": engine.max_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            size = int(request.headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > limits.max_body_bytes:
            return error_response(413, f"the body is larger than {limits.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return error_response(413, f"the body is larger than {limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return error_response(400, f"malformed JSON: {e}")
        try:
            parsed = parse_body(body, model_name, limits)
            if not engine.alive:
                raise Unavailable("the engine is not running")
            engine.check_room()  # before the host work
            settings = engine.settings(**parsed.sampling)
            prepared, max_tokens = await asyncio.to_thread(
                _prepare, engine, parsed.conversation, parsed.max_tokens, limits
            )
        except HTTPError as e:
            return error_response(e.status, e.message, e.kind)
        except Overloaded as e:
            return error_response(429, str(e), "rate_limit_error")
        except Unavailable as e:
            return error_response(503, str(e), "server_error")
        except (QwenVLError, ValueError, TypeError) as e:
            return error_response(400, str(e))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = EngineRequest(prepared, max_tokens, settings, emit, stop=parsed.stop)
        try:
            engine.submit(job)
        except Overloaded as e:
            return error_response(429, str(e), "rate_limit_error")
        except Unavailable as e:
            return error_response(503, str(e), "server_error")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if parsed.stream:
            chunks = _stream(job, events, rid, created, model_name, parsed)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return await _complete(request, job, events, rid, created, model_name, parsed)

    return app


def _prepare(engine: Engine, messages: Any, max_tokens: int | None, limits: Limits):
    return engine.prepare(parse_messages(messages, limits), max_tokens)


def _usage(event: Event) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


async def _complete(
    request: Request,
    job: EngineRequest,
    events: asyncio.Queue,
    rid: str,
    created: int,
    model_name: str,
    parsed: Parsed,
):
    text, ids = [], []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return error_response(499, "the client closed the request")
                continue
            if event.kind == "error":
                return error_response(500, event.message, "server_error")
            text.append(event.text)
            ids += event.token_ids
            if event.kind == "done":
                break
    except asyncio.CancelledError:
        job.cancel()
        raise
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(text)},
        "logprobs": None,
        "finish_reason": event.reason,
    }
    if parsed.token_ids:
        choice["token_ids"] = ids
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": _usage(event),
        }
    )


async def _stream(
    job: EngineRequest,
    events: asyncio.Queue,
    rid: str,
    created: int,
    model_name: str,
    parsed: Parsed,
) -> AsyncIterator[str]:
    def chunk(delta: dict, reason: str | None = None, ids: list[int] | None = None, **extra):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        if parsed.token_ids and ids is not None:
            choice["token_ids"] = ids
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, ids=[])
        while True:
            event = await events.get()
            if event.kind == "error":
                message = " ".join(event.message.split())
                error = {"message": message, "type": "server_error", "param": None, "code": 500}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event.text or event.token_ids:
                yield chunk({"content": event.text}, ids=event.token_ids)
            if event.kind == "done":
                yield chunk({}, event.reason, ids=[])
                if parsed.include_usage:
                    body = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(event),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away, or it is done: nothing more to send
