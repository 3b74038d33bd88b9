"""Text generation with a preallocated KV cache: one jitted prefill, one jitted decode step.

    out = generate(model, processor, messages, max_new_tokens=128)
    out.text, out.token_ids

Host side (numpy): the processor's arrays are laid out left-padded to a prompt-length bucket and the
vision patches padded to a patch-count bucket (`model.prepare(..., patch_bucket=...)`), so a new
image size or prompt length that falls in the same buckets reuses the compiled programs.

Device side: `prefill` runs the vision tower and the prompt, writes the KV cache (slots
[0, P) of a cache of P + N slots: prompt bucket + new-token bucket) and samples the first token.
`decode` feeds one token per sequence at slot P + s with rotary position next_position + s on every
M-RoPE axis (the prompt's rope delta carried on), updates the donated cache in place and samples
the next token. A `Generator` per model keeps the compiled programs; the host loop streams text and
stops at the checkpoint's end-of-sequence ids.

Sampling settings (`sampling_settings`): the arguments given, else the checkpoint's
generation_config.json, else transformers' defaults. A repetition penalty other than 1 adds a
bool[B, vocab] mask of the ids seen so far to the device state, set from the prompt at prefill and
updated by every decode step.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from qwenvl_jax.errors import ConfigError, InputError
from qwenvl_jax.inference.sampling import SamplingMode, mark_seen, sample
from qwenvl_jax.models.text import KVCache, one_run_per_layer
from qwenvl_jax.models.vision_inputs import bucket as patch_count_bucket
from qwenvl_jax.sharding import shard, use_mesh

log = logging.getLogger(__name__)

CACHE_AXES = (None, "batch", "length", "act_kv_heads", None)  # k, v: [L, B, S, K, hd]


class GenerateOutput(NamedTuple):
    """One conversation's answer. token_ids: the new tokens, ending with the stop token when one
    was produced; prompt_tokens: the prompt's length in tokens; timings (seconds): compile_s,
    prepare_s (host preprocessing), prefill_s (time to first token), decode_s,
    decode_tokens_per_s (all sequences of the batch together)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float]


class Prepared(NamedTuple):
    """A batch ready for the device. inputs: `model.prepare`'s ModelInputs; arrays: the processor
    outputs left-padded to prompt_bucket; prompt_tokens int[B]: each prompt's real length;
    new_bucket: cache slots for new tokens (cache length = prompt_bucket + new_bucket);
    max_new_tokens: as asked, or less where max_position_embeddings would be passed."""

    inputs: Any
    arrays: dict[str, Any]
    prompt_tokens: np.ndarray
    prompt_bucket: int
    new_bucket: int
    max_new_tokens: int


def length_bucket(n: int, minimum: int = 64) -> int:
    """`minimum`, then 8 sizes per power of two (less than 12.5% padding): the patch buckets'
    rule, `vision_inputs.bucket`."""
    return patch_count_bucket(n, minimum)


def left_pad(inputs: Mapping[str, Any], length: int, pad_id: int) -> dict[str, Any]:
    """Lay out every [B, T] array of processor outputs left-padded to [B, length] (the valid
    tokens of each row, by attention_mask, at its end); other entries are passed through."""
    ids = np.asarray(inputs["input_ids"])
    B, T = ids.shape
    mask = inputs.get("attention_mask")
    mask = np.ones((B, T), np.int64) if mask is None else np.asarray(mask)
    valid = mask == 1
    out = dict(inputs)
    out["attention_mask"] = mask
    for name, a in list(out.items()):
        if not (isinstance(a, np.ndarray) and a.shape == (B, T)):
            continue
        fill = pad_id if name == "input_ids" else 0
        new = np.full((B, length), fill, a.dtype)
        for b in range(B):
            row = a[b, valid[b]]
            new[b, length - len(row) :] = row
        out[name] = new
    return out


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _signature(tree: Any) -> tuple:
    """Hashable structure, shapes, dtypes and shardings of a pytree of arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (
            np.shape(x),
            x.dtype if hasattr(x, "dtype") else np.result_type(x),
            getattr(x, "sharding", None),
        )
        for x in leaves
    )


def _mesh_of(state: Any):
    for x in jax.tree.leaves(state):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


# ------------------------------------------------------------------------------ device side


def prefill_logits(
    model: nnx.Module,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    position_ids: jax.Array,
    vision: Any,
    *,
    cache_len: int,
    ntk_alpha: float = 1.0,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt into a fresh cache of `cache_len` slots.

    input_ids, segment_ids int[B, P] (left-padded: every row ends with its last prompt token);
    position_ids int[3, B, P]. Returns (logits float[B, vocab] of the last position, the cache
    with slots [0, P) written)."""
    B = input_ids.shape[0]
    dtype = getattr(model, "dtype", jnp.float32)
    empty = KVCache.empty(model.config.text, B, cache_len, dtype)
    cache = empty._replace(k=shard(empty.k, CACHE_AXES), v=shard(empty.v, CACHE_AXES))
    kw = {"logits_to_keep": 1} if _accepts(model.forward, "logits_to_keep") else {}
    logits, cache, _ = model.forward(
        input_ids,
        segment_ids,
        position_ids,
        vision,
        cache=cache,
        cache_index=0,
        ntk_alpha=ntk_alpha,
        **kw,
    )
    return logits[:, -1], cache


def decode_logits(
    model: nnx.Module,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    slot: jax.Array | int,
    *,
    ntk_alpha: float = 1.0,
) -> tuple[jax.Array, KVCache]:
    """Feed one token per sequence, tokens int[B], at cache slot `slot` with rotary position
    positions int[B] on every M-RoPE axis. Returns (logits float[B, vocab], the updated cache)."""
    B = tokens.shape[0]
    position_ids = jnp.broadcast_to(positions[None, :, None], (3, B, 1))
    segment_ids = jnp.ones((B, 1), jnp.int32)
    logits, cache, _ = model.forward(
        tokens[:, None],
        segment_ids,
        position_ids,
        None,
        cache=cache,
        cache_index=slot,
        ntk_alpha=ntk_alpha,
    )
    return logits[:, -1], cache


class Knobs(NamedTuple):
    """The traced sampling values: seed uint32[], temperature float32[], top_k int32[],
    top_p float32[], penalty float32[] (None when the mode has no repetition penalty)."""

    seed: Any
    temperature: Any
    top_k: Any
    top_p: Any
    penalty: Any = None


def _next_token(logits, step, seen, knobs: Knobs, mode: SamplingMode) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(knobs.seed), step)
    t, k, p = knobs.temperature, knobs.top_k, knobs.top_p
    return sample(logits, key, mode, t, k, p, knobs.penalty, seen)


def _prefill(
    state,
    input_ids,
    segment_ids,
    position_ids,
    vision,
    knobs: Knobs,
    *,
    graphdef,
    mode: SamplingMode,
    ntk_alpha: float,
    cache_len: int,
):
    """prefill_logits, then (the first new token int32[B], the cache, seen): seen bool[B, vocab]
    marks the ids of each prompt (None without a repetition penalty)."""
    model = nnx.merge(graphdef, state)
    logits, cache = prefill_logits(
        model,
        input_ids,
        segment_ids,
        position_ids,
        vision,
        cache_len=cache_len,
        ntk_alpha=ntk_alpha,
    )
    seen = None
    if mode.penalty:
        seen = shard(jnp.zeros(logits.shape, bool), ("batch", "act_vocab"))
        seen = mark_seen(seen, input_ids, segment_ids != 0)
    return _next_token(logits, 0, seen, knobs, mode), cache, seen


def _decode(
    state,
    cache,
    tokens,
    seen,
    next_position,
    first_slot,
    step,
    knobs: Knobs,
    *,
    graphdef,
    mode: SamplingMode,
    ntk_alpha: float,
):
    """Decode step `step`: feed each sequence's step-th new token at slot first_slot + step,
    position next_position + step, and mark it in seen; returns (the next token int32[B], the
    cache, seen)."""
    model = nnx.merge(graphdef, state)
    logits, cache = decode_logits(
        model, cache, tokens, next_position + step, first_slot + step, ntk_alpha=ntk_alpha
    )
    if mode.penalty:
        seen = mark_seen(seen, tokens)
    return _next_token(logits, step + 1, seen, knobs, mode), cache, seen


# ------------------------------------------------------------------------------ host side


class _TextStream:
    """Incremental detokenisation: the text added by each new token, held back while it ends in
    an incomplete UTF-8 sequence."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return delta


class Generator:
    """Generation for one model: the compiled prefill and decode programs are reused by every
    call whose padded shapes (batch, prompt bucket, cache length, patch bucket) and sampling mode
    were seen before. `Generator.for_model(model)` returns the model's one Generator."""

    _instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    # Compiled programs depend on the model's structure (its graphdef) and the argument shapes,
    # not on its weights: models of one structure share them.
    _programs: dict[tuple, Any] = {}

    def __init__(self, model: nnx.Module):
        self._model = weakref.ref(model)
        self._view: tuple[list, nnx.Module] | None = None

    def running_model(self) -> nnx.Module:
        """The model the programs run: on the CPU its one-run-per-layer copy
        (`models.text.one_run_per_layer`: XLA:CPU would copy each stacked layer's weights out of
        the stack on every decode step), made once and again only when the weights change."""
        model = self._model()
        if jax.default_backend() != "cpu":
            return model
        leaves = jax.tree.leaves(nnx.state(model))  # the view shares every array of the model
        if self._view is None or any(a is not b for a, b in zip(self._view[0], leaves)):
            self._view = (leaves, one_run_per_layer(model))
        return self._view[1]

    @classmethod
    def for_model(cls, model: nnx.Module) -> Generator:
        gen = cls._instances.get(model)
        if gen is None:
            gen = cls._instances[model] = cls(model)
        return gen

    def _program(self, fn: Callable, static: dict[str, Any], args: tuple, donate: tuple = ()):
        """The compiled `fn(*args)` for these static settings and argument shapes, compiled on
        first use; returns (compiled, seconds spent compiling now)."""
        key = (fn.__name__, tuple(sorted(static.items())), _signature(args))
        compiled = self._programs.get(key)
        if compiled is not None:
            return compiled, 0.0
        start = time.perf_counter()
        jitted = jax.jit(functools.partial(fn, **static), donate_argnums=donate)
        compiled = jitted.lower(*args).compile()
        self._programs[key] = compiled
        seconds = time.perf_counter() - start
        log.info("compiled %s in %.2fs (%d programs)", fn.__name__, seconds, len(self._programs))
        return compiled, seconds

    def prepare(self, processor: Any, conversations: list, max_new_tokens: int) -> Prepared:
        """Run the processor, check the prompt length, pad to the buckets, and `model.prepare`."""
        model = self._model()
        inputs = processor(conversations)
        ids = np.asarray(inputs["input_ids"])
        mask = inputs.get("attention_mask")
        lengths = (np.ones_like(ids) if mask is None else np.asarray(mask) == 1).sum(axis=1)
        longest = int(lengths.max())
        limit = int(model.config.text.max_position_embeddings)
        if longest >= limit:
            raise InputError(
                f"the prompt is {longest} tokens long; this model allows at most "
                f"{limit - 1} (max_position_embeddings {limit})"
            )
        if longest + max_new_tokens > limit:
            log.warning(
                "max_new_tokens cut from %d to %d by max_position_embeddings %d",
                max_new_tokens,
                limit - longest,
                limit,
            )
            max_new_tokens = limit - longest
        P, N = length_bucket(longest), length_bucket(max_new_tokens, minimum=32)
        text = model.config.text
        if text.use_logn_attn and longest + max_new_tokens > text.seq_length:
            P = longest  # Qwen-VL v1 scales queries past seq_length by cache slot: no padding
        pad_id = getattr(processor, "pad_token_id", None)
        if pad_id is None:
            pad_id = (list(getattr(processor, "eos_token_ids", [])) or [0])[0]
        inputs = left_pad(inputs, P, int(pad_id))
        kw = {k: v for k, v in inputs.items() if _accepts(model.prepare, k)}
        patches = sum(
            int(np.prod(np.asarray(inputs[g]), axis=-1).sum())
            for g in ("image_grid_thw", "video_grid_thw")
            if inputs.get(g) is not None
        )
        if patches and _accepts(model.prepare, "patch_bucket"):
            kw["patch_bucket"] = patch_count_bucket(patches)
        return Prepared(model.prepare(**kw), inputs, lengths, P, N, max_new_tokens)

    def generate(
        self,
        processor: Any,
        conversations: list,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
        stream: Callable[..., Any] | None,
        batched: bool,
        repetition_penalty: float = 1.0,
    ) -> list[GenerateOutput]:
        """Greedy when temperature == 0; repetition_penalty 1 = off."""
        t0 = time.perf_counter()
        prep = self.prepare(processor, conversations, max_new_tokens)
        x, lengths, P, N = prep.inputs, prep.prompt_tokens, prep.prompt_bucket, prep.new_bucket
        max_new_tokens = prep.max_new_tokens
        B = x.input_ids.shape[0]
        prepare_s = time.perf_counter() - t0

        graphdef, state = nnx.split(self.running_model())
        mode = SamplingMode.of(temperature, top_k, top_p, repetition_penalty)
        knobs = Knobs(
            np.uint32(seed % 2**32),
            np.float32(max(temperature, 1e-6)),
            np.int32(top_k),
            np.float32(top_p),
            np.float32(repetition_penalty) if mode.penalty else None,
        )
        ntk = float(x.ntk_alpha)
        prefill_args = (state, x.input_ids, x.segment_ids, x.position_ids, x.vision, knobs)
        with use_mesh(_mesh_of(state)):
            prefill, compile_s = self._program(
                _prefill,
                dict(graphdef=graphdef, mode=mode, ntk_alpha=ntk, cache_len=P + N),
                prefill_args,
            )
            tokens_aval, cache_aval, seen_aval = prefill.out_info
            next_position = np.asarray(x.next_position, np.int32)
            decode_args = (
                state,
                cache_aval,
                tokens_aval,
                seen_aval,
                next_position,
                np.int32(P),
                np.int32(0),
                knobs,
            )
            decode, seconds = self._program(
                _decode,
                dict(graphdef=graphdef, mode=mode, ntk_alpha=ntk),
                decode_args,
                donate=(1, 3),
            )
        compile_s += seconds

        stop = set(int(t) for t in getattr(processor, "eos_token_ids", []) or [])
        streams = [_TextStream(processor.decode) for _ in range(B)] if stream else None

        def emit(b: int, piece: str) -> None:
            if piece and batched:
                stream(b, piece)
            elif piece:
                stream(piece)

        new: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        start = time.perf_counter()
        token_dev, cache, seen = prefill(*prefill_args)
        step, first_at = 0, start
        while True:
            if step + 1 < max_new_tokens:  # queue the next step before waiting on this one
                next_dev, cache, seen = decode(
                    state, cache, token_dev, seen, next_position, np.int32(P), np.int32(step), knobs
                )
            tokens = np.asarray(token_dev)
            if step == 0:
                first_at = time.perf_counter()
            for b in np.nonzero(~done)[0]:
                t = int(tokens[b])
                new[b].append(t)
                done[b] = t in stop
                if streams is not None and not done[b]:
                    emit(int(b), streams[b].push(t))
            step += 1
            if done.all() or step >= max_new_tokens:
                break
            token_dev = next_dev
        end = time.perf_counter()
        del cache, seen

        decode_s = end - first_at
        timings = {
            "compile_s": compile_s,
            "prepare_s": prepare_s,
            "prefill_s": first_at - start,
            "decode_s": decode_s,
            "decode_tokens_per_s": B * (step - 1) / decode_s if step > 1 and decode_s > 0 else 0.0,
        }
        outputs = []
        for b in range(B):
            ids = new[b]
            text = processor.decode(ids[:-1] if ids and ids[-1] in stop else ids)
            if streams is not None and text.startswith(streams[b].text):
                emit(b, text[len(streams[b].text) :])  # what an incomplete character held back
            outputs.append(GenerateOutput(text, list(ids), int(lengths[b]), dict(timings)))
        return outputs


def _as_batch(messages: Any) -> tuple[list, bool]:
    if isinstance(messages, str) or not isinstance(messages, Sequence) or not messages:
        raise InputError(
            "messages must be a conversation (a list of {'role', 'content'} dicts) "
            "or a list of conversations"
        )
    if isinstance(messages[0], Mapping):
        return [list(messages)], False
    return [list(c) for c in messages], True


# transformers' defaults for the sampling settings that a checkpoint's generation_config.json
# leaves out (GenerationConfig._get_default_generation_params).
SAMPLING_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}


class Sampling(NamedTuple):
    """The sampling settings of one call (see `sampling_settings`)."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sampling_settings(
    generation_config: Mapping[str, Any] | None = None,
    *,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
) -> Sampling:
    """Each setting: the one given when not None, else the checkpoint's generation_config.json
    value, else transformers' default (SAMPLING_DEFAULTS), as transformers' `generate()` merges
    them. A temperature > 0 given without do_sample asks for sampling.

    Raises InputError for a bad value given, ConfigError for a bad value of the file."""
    given = dict(
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    given = {k: v for k, v in given.items() if v is not None}
    settings = generation_config or {}
    from_file = {k: settings[k] for k in SAMPLING_DEFAULTS if settings.get(k) is not None}
    values = {**SAMPLING_DEFAULTS, **from_file, **given}
    checks = {
        "do_sample": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
        "temperature": (lambda v: v >= 0, ">= 0"),
        "top_k": (lambda v: v >= 0 and v == int(v), "an integer >= 0"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "repetition_penalty": (lambda v: v > 0, "> 0"),
    }
    for name, (ok, want) in checks.items():
        value = values[name]
        try:
            good = not isinstance(value, str) and bool(ok(value))
        except (TypeError, ValueError, OverflowError):
            good = False
        if not good:
            if name in given:
                raise InputError(f"{name} must be {want}, got {value!r}")
            raise ConfigError(f"generation_config.json: {name} must be {want}, got {value!r}")
    if "temperature" in given and "do_sample" not in given:
        values["do_sample"] = values["temperature"] > 0
    return Sampling(
        bool(values["do_sample"]),
        float(values["temperature"]),
        int(values["top_k"]),
        float(values["top_p"]),
        float(values["repetition_penalty"]),
    )


def generate(
    model: nnx.Module,
    processor: Any,
    messages_or_batch: Sequence[Any],
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    stream: Callable[..., Any] | None = None,
    *,
    do_sample: bool | None = None,
    repetition_penalty: float | None = None,
) -> GenerateOutput | list[GenerateOutput]:
    """Generate the assistant's answer to one conversation (HF chat format) or to each of a list
    of conversations; returns a GenerateOutput, or a list of them for a list.

    Sampling settings left out (None) take the checkpoint's generation_config.json values
    (`processor.generation_config`), else transformers' defaults (do_sample False, temperature 1,
    top_k 50, top_p 1, repetition_penalty 1), as transformers' `generate()` does; given ones win,
    and a temperature > 0 given without do_sample asks for sampling. Greedy when do_sample is
    False or temperature == 0; else sampled with temperature, top_k (0 = off) and top_p (1 = off)
    from the PRNG key of `seed`. Before either, repetition_penalty (1 = off) divides the positive
    logits, and multiplies the negative ones, of every token id the sequence holds so far, prompt
    included. Plain greedy decoding: do_sample=False, repetition_penalty=1.0.

    Stops at the processor's end-of-sequence ids (generation_config.json) or after
    max_new_tokens. `stream`, when given, receives each new piece of text as it is produced:
    `stream(text)`, or `stream(index, text)` for a list.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    settings = sampling_settings(
        getattr(processor, "generation_config", None),
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    conversations, batched = _as_batch(messages_or_batch)
    outputs = Generator.for_model(model).generate(
        processor,
        conversations,
        max_new_tokens=int(max_new_tokens),
        temperature=0.0 if settings.greedy else settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=int(seed),
        stream=stream,
        batched=batched,
        repetition_penalty=settings.repetition_penalty,
    )
    return outputs if batched else outputs[0]
