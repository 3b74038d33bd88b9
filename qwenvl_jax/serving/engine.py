"""Continuous batching: a fixed set of decode slots over one preallocated KV cache.

The cache holds `max_batch` rows of `max_len` slots (k, v: [L, max_batch, max_len, K, hd]); a
request owns one row while it runs, and the rows are used as rings. Every decode step writes all
rows at the same ring slot `write` (then moves it on), and a query attends to every slot of its
own row that the row's segment ids mark, whatever their order: each row sees only its own keys.
A hybrid model's (Qwen3.5) linear-attention layers keep, per row, their conv inputs and delta-rule
state instead (not positional: the ring does not concern them); a row that runs no request feeds
padding at each step, which leaves them as they are.

A request's prompt is laid out as `qj.generate` lays out a batch of one (`Generator.prepare`:
left-padded to its prompt-length bucket P), prefilled on its own, and its keys and values are
laid into the P ring slots before `write` (the rest of its row cleared), its linear-attention
states, run from zero, in place of the row's. Its s-th new token is fed with rotary position
next_position + s, so each row keeps its own M-RoPE rope delta, and the per-row sampling
settings (temperature, top_k, top_p, repetition penalty, seed) pick its tokens as `qj.generate`
would for that request alone. A request needs P + max_tokens <= max_len slots.

Programs: the prefill compiles once per (prompt bucket, vision patch bucket, sampling mode), the
decode step once per set of sampling modes among the running requests; neither depends on which
requests come and go. One background thread owns the device: it admits queued requests into
free rows (up to `prefill_tokens` padded prompt tokens between two decode steps, at least one
prompt), runs the decode step, detokenizes, applies the stop conditions (end-of-sequence ids,
stop strings, max_tokens) and hands text to each request's `emit` callback. A cancelled request
(its client went away) leaves its row at the next step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.errors import InputError, QwenVLError
from qwenvl_jax.inference.generate import (
    CACHE_AXES,
    Generator,
    Prepared,
    _mesh_of,
    _TextStream,
    prefill_logits,
    sampling_settings,
)
from qwenvl_jax.inference.sampling import SamplingMode, mark_seen, sample
from qwenvl_jax.models.text import KVCache
from qwenvl_jax.sharding import shard, use_mesh

log = logging.getLogger(__name__)


class Overloaded(QwenVLError):
    """The request queue is full: try again later."""


class Unavailable(QwenVLError):
    """The engine is not running (stopped, or its device state was lost)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's sampling: temperature 0 = greedy; top_k 0 = off; top_p 1 = off;
    penalty 1 = no repetition penalty."""

    temperature: float
    top_k: int
    top_p: float
    penalty: float
    seed: int

    @property
    def mode(self) -> SamplingMode:
        return SamplingMode.of(self.temperature, self.top_k, self.top_p, self.penalty)

    def knobs(self) -> tuple:
        """(seed uint32, temperature float32, top_k int32, top_p float32, penalty float32), as
        `qj.generate` passes them to the sampler."""
        return (
            np.uint32(self.seed % 2**32),
            np.float32(max(self.temperature, 1e-6)),
            np.int32(self.top_k),
            np.float32(self.top_p),
            np.float32(self.penalty),
        )


@dataclasses.dataclass
class Event:
    """What a request's `emit` receives. kind "text": `text` is new answer text and `token_ids`
    the tokens produced since the last event; kind "done": the request finished (`reason`
    "stop" or "length"; `text` the rest of the answer); kind "error": `message` says why it
    failed."""

    kind: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


@dataclasses.dataclass(eq=False)
class Request:
    """A prepared request: `prepared` from `Engine.prepare`, `emit` called from the engine
    thread with each Event (it must not block)."""

    prepared: Prepared
    max_tokens: int
    settings: Settings
    emit: Callable[[Event], None]
    stop: Sequence[str] = ()
    cancelled: bool = False
    # running state (engine thread)
    row: int = -1
    token_ids: list[int] = dataclasses.field(default_factory=list)
    stream: Any = None
    sent: int = 0  # characters of the answer text already emitted
    unsent: list[int] = dataclasses.field(default_factory=list)  # token ids not yet emitted

    def cancel(self) -> None:
        """Leave the slot at the next step (the client went away); nothing more is emitted."""
        self.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return int(self.prepared.prompt_tokens[0])


# ------------------------------------------------------------------------------ device side


def _pick(logits, seen, seed, index, temperature, top_k, top_p, penalty, *, mode: SamplingMode):
    """One row's token: logits float[V], seen bool[V]; the PRNG key of `seed` folded with the
    token's index, as `qj.generate` draws it."""
    key = jax.random.fold_in(jax.random.key(seed), index)
    pen = penalty if mode.penalty else None
    return sample(logits[None], key, mode, temperature, top_k, top_p, pen, seen[None])[0]


def _prefill_row(
    state,
    cache,
    seen,
    row,
    write,
    input_ids,
    segment_ids,
    position_ids,
    vision,
    knobs,
    *,
    graphdef,
    mode,
    ntk_alpha,
):
    """Run one prompt (batch 1, left-padded to P) on its own, then lay its keys and values into
    row `row` of the cache at the P ring slots before `write`, the rest of the row cleared, and
    (Qwen3.5) its linear-attention layers' conv and delta-rule states, run from zero, in place of
    the row's. Returns (its first token int32[], the cache, seen with the row set to the prompt's
    ids)."""
    model = nnx.merge(graphdef, state)
    P = input_ids.shape[1]
    S = cache.segment_ids.shape[1]
    logits, fresh = prefill_logits(
        model, input_ids, segment_ids, position_ids, vision, cache_len=P, ntk_alpha=ntk_alpha
    )
    at = (write - P + jnp.arange(P)) % S

    def put(full, part):  # part [L, 1, P, K, hd]
        return full.at[:, row].set(0).at[:, row, at].set(part[:, 0].astype(full.dtype))

    def replace(full, part):  # part [Ll, 1, ...]: the prompt's linear-attention state
        return full.at[:, row].set(part[:, 0].astype(full.dtype))

    cache = cache._replace(
        k=shard(put(cache.k, fresh.k), CACHE_AXES),
        v=shard(put(cache.v, fresh.v), CACHE_AXES),
        segment_ids=cache.segment_ids.at[row].set(0).at[row, at].set(fresh.segment_ids[0]),
    )
    if cache.conv is not None:
        cache = cache._replace(
            conv=replace(cache.conv, fresh.conv),
            recurrent=replace(cache.recurrent, fresh.recurrent),
        )
    seen_row = mark_seen(jnp.zeros((1, seen.shape[1]), bool), input_ids, segment_ids != 0)
    seen = jax.lax.dynamic_update_slice(seen, seen_row, (row, 0))
    seed, temperature, top_k, top_p, penalty = knobs
    token = _pick(logits[0], seen_row[0], seed, 0, temperature, top_k, top_p, penalty, mode=mode)
    return token, cache, seen


def _decode_rows(
    state,
    cache,
    seen,
    tokens,
    positions,
    live,
    write,
    index,
    knobs,
    mode_index,
    *,
    graphdef,
    modes,
    ntk_alpha,
):
    """Every row feeds tokens[b] with rotary position positions[b] (on every M-RoPE axis) into
    ring slot `write` of its cache row, attending to the keys of its own row that its segment
    ids mark; marks the token seen and picks its next token (the index[b]-th of its answer) with
    its own knobs (arrays [B]) and sampling mode modes[mode_index[b]]. A row that runs no request
    (live[b] false) feeds padding: its linear-attention states stay as they are and its ring
    slot is marked empty. Returns (next tokens int32[B], the cache, seen)."""
    model = nnx.merge(graphdef, state)
    B, S = cache.segment_ids.shape
    logits, cache, _ = model.forward(
        tokens[:, None],
        live[:, None].astype(jnp.int32),
        jnp.broadcast_to(positions[None, :, None], (3, B, 1)),
        None,
        cache=cache,
        cache_index=write,
        # a query's causal index past every slot: the ring's keys are told apart by segment ids
        slots=jnp.full((B, 1), S - 1, jnp.int32),
        ntk_alpha=ntk_alpha,
    )
    logits = logits[:, -1]
    seen = mark_seen(seen, tokens)
    seed, temperature, top_k, top_p, penalty = knobs
    picks = [
        jax.vmap(functools.partial(_pick, mode=m))(
            logits, seen, seed, index, temperature, top_k, top_p, penalty
        )
        for m in modes
    ]
    nxt = picks[0] if len(picks) == 1 else jnp.stack(picks)[mode_index, jnp.arange(B)]
    return nxt, cache, seen


# ------------------------------------------------------------------------------ host side


class Engine:
    """The slot scheduler for one model and processor.

    max_batch: decode slots (requests running at once); max_len: cache slots per request (its
    prompt padded to its bucket, plus max_tokens); max_queue: requests waiting for a slot before
    `submit` refuses with Overloaded; prefill_tokens: prompt tokens (padded) prefilled between two
    decode steps while requests are running (at least one prompt)."""

    def __init__(
        self,
        model: nnx.Module,
        processor: Any,
        *,
        max_batch: int = 8,
        max_len: int = 4096,
        max_queue: int = 64,
        prefill_tokens: int = 2048,
    ):
        if max_batch < 1 or max_len < 2 or max_queue < 0:
            raise InputError(
                f"max_batch must be >= 1, max_len >= 2, max_queue >= 0; got {max_batch}, "
                f"{max_len}, {max_queue}"
            )
        text = model.config.text
        if text.use_dynamic_ntk or text.use_logn_attn:
            # Qwen-VL v1 changes its rotary base and query scale past seq_length: keep every
            # request within it so that all rows decode with the same settings.
            if max_len > text.seq_length:
                log.warning("max_len cut from %d to seq_length %d", max_len, text.seq_length)
            max_len = min(max_len, int(text.seq_length))
        self.model, self.processor = model, processor
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_tokens = prefill_tokens
        self.generation_config = dict(getattr(processor, "generation_config", None) or {})
        self.eos = {int(t) for t in getattr(processor, "eos_token_ids", []) or []}
        self._generator = Generator.for_model(model)
        self._graphdef, self._state = nnx.split(self._generator.running_model())
        self._mesh = _mesh_of(self._state)
        self.compiles: collections.Counter = collections.Counter()
        static = dict(graphdef=self._graphdef, ntk_alpha=1.0)
        self._prefill = self._jit(_prefill_row, static, "mode")
        self._decode = self._jit(_decode_rows, static, "modes")
        self._lock = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * max_batch
        self._running = False
        self._thread: threading.Thread | None = None
        self._cache = self._seen = None
        # per-row host state of the decode step
        B = max_batch
        self._tokens = np.zeros(B, np.int32)
        self._positions = np.zeros(B, np.int32)
        self._write = 0  # the ring slot every row writes at the next decode step
        self._index = np.zeros(B, np.int32)
        self._knobs = [np.zeros(B, np.uint32)] + [
            np.zeros(B, t) for t in (np.float32, np.int32, np.float32, np.float32)
        ]
        self._reset_knobs()
        self.stats = collections.Counter()

    # ---------------------------------------------------------------- client side (any thread)

    def settings(
        self,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> Settings:
        """A request's sampling settings: those given, else the checkpoint's
        generation_config.json, else transformers' defaults (`sampling_settings`, as
        `qj.generate`); seed None draws one."""
        s = sampling_settings(
            self.generation_config,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        if seed is None:
            seed = int(np.random.default_rng().integers(2**32))
        return Settings(
            0.0 if s.greedy else s.temperature, s.top_k, s.top_p, s.repetition_penalty, int(seed)
        )

    def prepare(self, conversation: list, max_tokens: int | None) -> tuple[Prepared, int]:
        """Process one conversation for the device (host work: run it in a worker thread).
        Returns (prepared inputs, max_tokens: as given, else what the request's slot holds).
        Raises InputError for a prompt or max_tokens that does not fit."""
        if max_tokens is not None and (
            not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1
        ):
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        prep = self._generator.prepare(self.processor, [conversation], max_tokens or 1)
        n, P = int(prep.prompt_tokens[0]), prep.prompt_bucket
        room = self.max_len - P
        if room < 1:
            raise InputError(
                f"the prompt is {n} tokens long ({P} padded); this server holds at most "
                f"{self.max_len} tokens per request (--max-len)"
            )
        limit = int(self.model.config.text.max_position_embeddings) - n
        if max_tokens is None:
            return prep, min(room, limit)
        if max_tokens > room:
            raise InputError(
                f"max_tokens {max_tokens} is too large: the prompt takes {P} of the "
                f"{self.max_len} tokens a request may hold (--max-len), {room} are left"
            )
        return prep, int(prep.max_new_tokens)

    def submit(self, request: Request) -> None:
        """Queue a prepared request; raises Overloaded when the queue is full, Unavailable when
        the engine is not running."""
        with self._lock:
            if not self._running:
                raise Unavailable("the engine is not running")
            self._check_room()
            self._queue.append(request)
            self._lock.notify()

    def check_room(self) -> None:
        """Raise Overloaded when a request submitted now would be refused."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        waiting = sum(not r.cancelled for r in self._queue)  # a cancelled one leaves unserved
        if waiting >= self.max_queue and waiting >= self._free_rows():
            raise Overloaded(f"the server is busy ({waiting} requests queued)")

    def load(self) -> dict[str, int]:
        """Running and queued requests."""
        with self._lock:
            running = sum(r is not None for r in self._rows)
            return {"running": running, "queued": len(self._queue), "slots": self.max_batch}

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def _jit(self, fn: Callable, static: dict, static_name: str) -> Callable:
        """fn jitted with the cache and seen donated; `self.compiles[fn name]` counts how often
        it is traced (once per new argument shape or static setting), which is when it
        compiles."""

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.compiles[fn.__name__] += 1
            return fn(*args, **kwargs, **static)

        return jax.jit(traced, static_argnames=(static_name,), donate_argnums=(1, 2))

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        with self._lock:
            if self._running:
                return self
            self._allocate()
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="qwenvl-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; queued and running requests get an error event."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for r in [*self._queue, *(r for r in self._rows if r is not None)]:
            self._send(r, Event("error", message="the server is shutting down"))
        self._queue.clear()
        self._rows = [None] * self.max_batch
        self._cache = self._seen = None

    def _allocate(self) -> None:
        cfg = self.model.config.text
        dtype = getattr(self.model, "dtype", jnp.float32)
        with use_mesh(self._mesh):
            empty = KVCache.empty(cfg, self.max_batch, self.max_len, dtype)
            self._cache = empty._replace(k=shard(empty.k, CACHE_AXES), v=shard(empty.v, CACHE_AXES))
            self._seen = shard(
                jnp.zeros((self.max_batch, cfg.vocab_size), bool), ("batch", "act_vocab")
            )
        self._cache, self._seen = _on_mesh_of((self._cache, self._seen), self._state)

    def _reset_knobs(self, row: int | None = None) -> None:
        defaults = Settings(0.0, 0, 1.0, 1.0, 0).knobs()
        for arr, value in zip(self._knobs, defaults):
            if row is None:
                arr[:] = value
            else:
                arr[row] = value

    def _free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._queue and all(r is None for r in self._rows):
                    self._lock.wait()
                if not self._running:
                    return
                admit = []
                budget = self.prefill_tokens
                busy = any(r is not None for r in self._rows)
                free = [b for b, r in enumerate(self._rows) if r is None]
                while self._queue and free:
                    r = self._queue[0]
                    if r.cancelled:
                        self._queue.popleft()
                        continue
                    P = r.prepared.prompt_bucket
                    if busy and admit and budget < P:
                        break
                    budget -= P
                    self._queue.popleft()
                    r.row = free.pop(0)
                    self._rows[r.row] = r
                    admit.append(r)
            for r in self._rows:
                if r is not None and r.cancelled and r not in admit:
                    self._release(r)
            try:
                for r in admit:
                    if r.cancelled:
                        self._release(r)
                    else:
                        self._prefill_one(r)
                if any(r is not None for r in self._rows):
                    self._step()
            except Exception as e:  # a device failure: fail what runs, start afresh
                log.exception("engine step failed")
                for r in self._rows:
                    if r is not None:
                        self._fail(r, f"generation failed: {type(e).__name__}: {e}")
                try:
                    self._allocate()
                except Exception:
                    log.exception("cannot reallocate the cache; the engine stops")
                    with self._lock:
                        self._running = False
                    return

    def _prefill_one(self, r: Request) -> None:
        x = r.prepared.inputs
        b = r.row
        mode = r.settings.mode
        try:
            with use_mesh(self._mesh):
                token, self._cache, self._seen = self._prefill(
                    self._state,
                    self._cache,
                    self._seen,
                    np.int32(b),
                    np.int32(self._write),
                    x.input_ids,
                    x.segment_ids,
                    x.position_ids,
                    x.vision,
                    r.settings.knobs(),
                    mode=mode,
                )
            token = int(token)
        except Exception as e:
            if self._cache is not None and not _deleted(self._cache):
                self._fail(r, f"generation failed: {type(e).__name__}: {e}")
                return
            raise
        self.stats["prefills"] += 1
        r.stream = _TextStream(lambda ids: self.processor.decode(ids, skip_special_tokens=False))
        self._positions[b] = int(np.asarray(x.next_position)[0])
        self._index[b] = 0
        for arr, value in zip(self._knobs, r.settings.knobs()):
            arr[b] = value
        self._accept(r, token)

    def _step(self) -> None:
        rows = [r for r in self._rows if r is not None]
        if not rows:
            return
        modes = tuple(sorted({r.settings.mode for r in rows}))
        mode_index = np.zeros(self.max_batch, np.int32)
        live = np.zeros(self.max_batch, bool)
        for r in rows:
            mode_index[r.row] = modes.index(r.settings.mode)
            live[r.row] = True
        # each running row feeds its last token; index: the new token's place in its answer
        index = self._index + 1
        with use_mesh(self._mesh):
            nxt, self._cache, self._seen = self._decode(
                self._state,
                self._cache,
                self._seen,
                self._tokens.copy(),
                self._positions.copy(),
                live,
                np.int32(self._write),
                index,
                tuple(a.copy() for a in self._knobs),
                mode_index,
                modes=modes,
            )
        nxt = np.asarray(nxt)
        self._write = (self._write + 1) % self.max_len
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(rows)
        for r in rows:
            b = r.row
            self._positions[b] += 1
            self._index[b] += 1
            if r.cancelled:
                self._release(r)
            else:
                self._accept(r, int(nxt[b]))

    def _accept(self, r: Request, token: int) -> None:
        """A new token of request r: finish it at a stop condition, else emit new text."""
        r.token_ids.append(token)
        r.unsent.append(token)
        self._tokens[r.row] = token
        if token in self.eos:
            return self._finish(r, "stop", eos=True)
        r.stream.push(token)
        text = r.stream.text
        for s in r.stop:
            at = text.find(s, max(0, r.sent - len(s) + 1))
            if at >= 0:
                return self._finish(r, "stop", cut=at)
        if len(r.token_ids) >= r.max_tokens:
            return self._finish(r, "length")
        # hold back what could be the start of a stop string
        hold = max((len(s) - 1 for s in r.stop), default=0)
        end = max(r.sent, len(text) - hold)
        if end > r.sent:
            self._send(r, Event("text", text=text[r.sent : end], token_ids=r.unsent))
            r.sent, r.unsent = end, []

    def _finish(self, r: Request, reason: str, *, eos: bool = False, cut: int | None = None):
        ids = r.token_ids[:-1] if eos else r.token_ids
        text = self.processor.decode(ids, skip_special_tokens=False)
        if cut is not None:
            text = text[:cut]
        rest = text[r.sent :] if len(text) >= r.sent else ""
        self._send(
            r,
            Event(
                "done",
                text=rest,
                token_ids=r.unsent,
                reason=reason,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=len(r.token_ids),
            ),
        )
        self.stats["finished"] += 1
        self._release(r)

    def _fail(self, r: Request, message: str) -> None:
        self._send(r, Event("error", message=message))
        self._release(r)

    def _release(self, r: Request) -> None:
        with self._lock:
            if 0 <= r.row < self.max_batch and self._rows[r.row] is r:
                self._rows[r.row] = None
                self._reset_knobs(r.row)
                self._tokens[r.row] = 0
                self._positions[r.row] = self._index[r.row] = 0

    def _send(self, r: Request, event: Event) -> None:
        if r.cancelled and event.kind != "error":
            return
        try:
            r.emit(event)
        except Exception:  # the client's side is gone
            log.debug("dropping an event of a closed request", exc_info=True)
            r.cancelled = True


def _on_mesh_of(tree: Any, state: Any) -> Any:
    """tree's arrays on the mesh of the model's parameters (replicated unless already placed on a
    mesh), as the jitted programs return them: the first prefill then takes the same argument
    types as every later one and does not compile a program of its own."""
    mesh = next(
        (
            x.sharding.mesh
            for x in jax.tree.leaves(state)
            if isinstance(getattr(x, "sharding", None), NamedSharding)
        ),
        None,
    )
    if mesh is None:
        return tree

    def put(x):
        if isinstance(x.sharding, NamedSharding):
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(put, tree)


def _deleted(cache: KVCache) -> bool:
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(cache))


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """True once no request runs or waits (for tests and benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        load = engine.load()
        if not load["running"] and not load["queued"]:
            return True
        time.sleep(0.01)
    return False
