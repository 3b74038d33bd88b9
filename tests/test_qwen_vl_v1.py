"""Qwen-VL v1 (family qwen_vl) against the golden outputs of the original PyTorch code
(../shared/fixtures/qwen_vl_v1_tiny): logits, top-16 ids, greedy continuations, the tokenizer's
ids and pixels; plus long prompts (dynamic NTK, logn) against a reference decoder, the real
config's parameter count, the bit-exact bicubic position tables, the checkpoint mapping both ways
and the .bin -> Orbax -> safetensors round trip. Sharded == unsharded: test_qwen_vl_v1_sharding.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import qwenvl_jax as qj
from qwenvl_jax import cli
from qwenvl_jax.config import from_hf, load_config
from qwenvl_jax.errors import CheckpointError, InputError
from qwenvl_jax.inference.generate import generate
from qwenvl_jax.loading.mapping import mapping_for
from qwenvl_jax.loading.reader import open_checkpoint
from qwenvl_jax.loading.writer import write_safetensors
from qwenvl_jax.modeling import params_as_numpy
from qwenvl_jax.models.qwen_vl_v1 import QwenVLV1ForCausalLM
from qwenvl_jax.models.text import KVCache
from qwenvl_jax.models.v1_vision import bicubic_resize, sincos_table
from qwenvl_jax.processing.qwen_vl_v1 import QwenVLProcessor, find_tiktoken_file
from tests.checkpoints import v1_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "qwen_vl_v1_tiny"
REAL = SHARED / "reference_configs" / "Qwen__Qwen-VL-Chat"
SCENARIOS = (
    json.loads((FIXTURE / "expected" / "scenarios.json").read_text())["scenarios"]
    if FIXTURE.is_dir()
    else []
)  # without it the module skips (pytestmark)
NAMES = [s["name"] for s in SCENARIOS]
GREEDY = 24
CACHE_LEN = 384  # every scenario's prompt + 24 new tokens fits: one compiled decode step

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="the shared fixture is missing")


def scenario(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    s = next(s for s in SCENARIOS if s["name"] == name)
    return s, dict(np.load(FIXTURE / "expected" / s["file"]))


def tolerance(expected: np.ndarray) -> float:
    """The fixture's tolerance: 1e-4 x max(1, max|value|)."""
    return 1e-4 * max(1.0, float(np.abs(expected).max()))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return v1_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(checkpoint) -> QwenVLV1ForCausalLM:
    return qj.from_pretrained(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def processor(checkpoint) -> QwenVLProcessor:
    return qj.Processor.from_pretrained(checkpoint)


@pytest.fixture()
def in_fixture(monkeypatch):
    """The fixture's messages name images relative to the fixture folder, as the original ran."""
    monkeypatch.chdir(FIXTURE)


# ------------------------------------------------------------------------- jitted programs


def _prefill(state, ids, seg, pos, vision, *, graphdef, alpha):
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config.text, ids.shape[0], CACHE_LEN, jnp.float32)
    logits, cache, _ = model.forward(
        ids, seg, pos, vision, cache=cache, cache_index=0, ntk_alpha=alpha
    )
    values, top = jax.lax.top_k(logits, 16)
    return logits[:, -4:], values, top, jnp.argmax(logits[:, -1], axis=-1), cache


def _decode(state, cache, token, slot, *, graphdef, alpha):
    model = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(slot, (3, 1, 1))
    logits, cache, _ = model.forward(
        token.reshape(1, 1),
        jnp.ones((1, 1), jnp.int32),
        pos,
        None,
        cache=cache,
        cache_index=slot,
        ntk_alpha=alpha,
    )
    return jnp.argmax(logits[0, -1]), cache


@functools.cache
def _programs(graphdef, alpha: float):
    return (
        jax.jit(functools.partial(_prefill, graphdef=graphdef, alpha=alpha)),
        jax.jit(functools.partial(_decode, graphdef=graphdef, alpha=alpha), donate_argnums=1),
    )


def run_fixture_prompt(model, input_ids, pixel_values):
    """Prefill with a cache (logits of the last 4 positions, top-16 everywhere), then 24 greedy
    one-token decode steps on that cache, as the fixture's greedy continuation was made."""
    x = model.prepare(input_ids, pixel_values=pixel_values)
    graphdef, state = nnx.split(model)
    prefill, decode = _programs(graphdef, x.ntk_alpha)
    with jax.default_matmul_precision("highest"):
        last4, values, top, token, cache = prefill(
            state, x.input_ids, x.segment_ids, x.position_ids, x.vision
        )
        tokens = [int(token[0])]
        T = x.input_ids.shape[1]
        for step in range(GREEDY - 1):
            token, cache = decode(
                state, cache, jnp.asarray(tokens[-1], jnp.int32), jnp.asarray(T + step, jnp.int32)
            )
            tokens.append(int(token))
    return np.asarray(last4)[0], np.asarray(values)[0], np.asarray(top)[0], tokens


def assert_top16(ids, values, expected_ids, expected_values, tol):
    """Top-16 values within tol at every rank; ids equal at every rank, except that ids may swap
    inside a run of ranks whose stored values are within tol of their neighbours (a near-tie,
    the README's rule), and a tie run reaching rank 16 may bring in an id ranked just below."""
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=tol)
    for t in range(len(ids)):
        gaps = np.abs(np.diff(expected_values[t])) > tol
        cuts = [0, *(r + 1 for r in np.flatnonzero(gaps)), 16]
        for a, b in zip(cuts, cuts[1:]):
            if b == 16 and b - a > 1:
                continue
            assert sorted(ids[t, a:b]) == sorted(expected_ids[t, a:b]), (
                f"position {t}, ranks {a}..{b - 1}: {ids[t]} vs {expected_ids[t]}"
            )


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_fixture_logits_top16_and_greedy(model, name):
    s, d = scenario(name)
    last4, values, top, greedy = run_fixture_prompt(model, d["input_ids"], d.get("pixel_values"))
    tol = tolerance(d["logits_last4"])
    assert (
        s["ntk_alpha"]
        == model.prepare(d["input_ids"], pixel_values=d.get("pixel_values")).ntk_alpha
    )
    np.testing.assert_allclose(last4, d["logits_last4"], rtol=0, atol=tol)
    assert_top16(top, values, d["top16_ids"], d["top16_values"], tol)
    assert greedy == d["greedy_ids"].tolist() == s["greedy"]["token_ids"]


def test_fixture_image_embeddings(model):
    visual = jax.jit(lambda state, px: nnx.merge(*state).visual(px))
    for name in ("astronaut_what", "coffee_grounding"):
        _, d = scenario(name)
        with jax.default_matmul_precision("highest"):
            out = np.asarray(visual(nnx.split(model), d["pixel_values"]))
        np.testing.assert_allclose(
            out, d["image_embeds"], rtol=0, atol=tolerance(d["image_embeds"])
        )


def test_call_with_processor_outputs_matches_fixture(model, processor, in_fixture):
    """The whole chain: processor -> model(**inputs) -> logits."""
    s, d = scenario("coffee_grounding")
    inputs = processor(s["messages"])
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(**inputs)[:, -4:])
    np.testing.assert_allclose(
        logits[0], d["logits_last4"], rtol=0, atol=tolerance(d["logits_last4"])
    )


def test_padding_columns_do_not_move_positions(model):
    """Columns that are padding in every row (prompt-length buckets) are not counted as slots:
    a left-padded prompt gives the logits of the unpadded one."""
    _, d = scenario("text_only")
    ids = d["input_ids"]
    pad = 15
    padded = np.concatenate([np.full((1, pad), 151643), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones_like(ids)], axis=1)
    x = model.prepare(padded, mask)
    assert x.position_ids[0, 0, pad] == 0 and x.next_position[0] == ids.shape[1]
    fn = jax.jit(lambda state, a, b, c: nnx.merge(*state).forward(a, b, c)[0][:, -4:])
    with jax.default_matmul_precision("highest"):
        out = np.asarray(fn(nnx.split(model), x.input_ids, x.segment_ids, x.position_ids))
    np.testing.assert_allclose(out[0], d["logits_last4"], rtol=0, atol=tolerance(d["logits_last4"]))


def test_generate_reproduces_greedy_continuation(model, processor, in_fixture):
    s, d = scenario("astronaut_what")
    with jax.default_matmul_precision("highest"):
        out = generate(model, processor, s["messages"], max_new_tokens=GREEDY, temperature=0.0)
    assert out.token_ids == d["greedy_ids"].tolist()


def _reference_decoder(
    w: dict, ids: np.ndarray, alpha: float, logn_on: bool = True, keep: int = 4
) -> np.ndarray:
    """The Qwen-7B decoder of QWEN_VL_V1.md section 5 in torch float32, text only: slot positions,
    rotary base 10000 * alpha^(hd/(hd-2)), logn scaling past 2048, last `keep` logits.
    w: the checkpoint's LLM tensors as float32 torch tensors."""
    import torch

    T, hd, H, eps = ids.shape[1], 64, 2, 1e-6

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    base = 10000 * alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat([emb, emb], dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    p = torch.arange(1, T + 1, dtype=torch.float64)
    logn = torch.where((p > 2048) & logn_on, torch.log(p) / np.log(2048), 1.0)
    logn = logn.float()[:, None, None]
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    h = w["transformer.wte.weight"][torch.from_numpy(ids[0])]
    for i in range(2):
        L = f"transformer.h.{i}"
        x = rms(h, w[f"{L}.ln_1.weight"])
        qkv = x @ w[f"{L}.attn.c_attn.weight"].T + w[f"{L}.attn.c_attn.bias"]
        q, k, v = (t.reshape(T, H, hd) for t in qkv.split(H * hd, dim=-1))
        q, k = rotate(q, cos, sin) * logn, rotate(k, cos, sin)
        scores = torch.einsum("thd,shd->hts", q, k) / hd**0.5 + mask
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, H * hd)
        h = h + out @ w[f"{L}.attn.c_proj.weight"].T
        x = rms(h, w[f"{L}.ln_2.weight"])
        up, gate = x @ w[f"{L}.mlp.w1.weight"].T, x @ w[f"{L}.mlp.w2.weight"].T
        h = h + (up * torch.nn.functional.silu(gate)) @ w[f"{L}.mlp.c_proj.weight"].T
    h = rms(h, w["transformer.ln_f.weight"])
    return (h[-keep:] @ w["lm_head.weight"].T).numpy()


def test_long_prompt_dynamic_ntk_and_logn(model, checkpoint):
    """Past seq_length (2048) the prefill uses NTK alpha 3 and logn-scaled queries (the
    fixture's prompts are too short to show either)."""
    ids = np.random.default_rng(2).integers(0, 151643, size=(1, 3000))
    x = model.prepare(ids)
    assert x.ntk_alpha == 3.0
    fn = jax.jit(
        lambda state, a, b, c: nnx.merge(*state).forward(a, b, c, ntk_alpha=3.0, logits_to_keep=4)[
            0
        ]
    )
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(fn(nnx.split(model), x.input_ids, x.segment_ids, x.position_ids))[0]
    with open_checkpoint(checkpoint) as reader:
        w = {
            k: torch.from_numpy(reader.get(k).astype(np.float32))
            for k in reader
            if not k.startswith("transformer.visual")
        }
    expected = _reference_decoder(w, ids, 3.0)
    tol = tolerance(expected)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=tol)
    # the comparison can tell both mechanisms apart
    assert np.abs(_reference_decoder(w, ids, 1.0) - expected).max() > 10 * tol
    assert np.abs(_reference_decoder(w, ids, 3.0, logn_on=False) - expected).max() > 10 * tol


# ------------------------------------------------------------------------- model inputs


def test_prepare_checks_images_and_buckets(model):
    _, d = scenario("astronaut_what")
    ids, px = d["input_ids"], d["pixel_values"]
    with pytest.raises(InputError, match="no pixel_values"):
        model.prepare(ids)
    with pytest.raises(InputError, match="holds 2"):
        model.prepare(ids, pixel_values=np.concatenate([px, px]))
    with pytest.raises(InputError, match="float\\[n, 3, 448, 448\\]"):
        model.prepare(ids, pixel_values=px[:, :, :224])
    broken = ids.copy()
    broken[0, 100] = 151858  # a stray </img>
    with pytest.raises(InputError, match="1 <img> but 2 </img>"):
        model.prepare(broken, pixel_values=px)
    with pytest.raises(InputError, match="not followed by 256"):
        model.prepare(ids[:, :200], pixel_values=px)  # truncated inside the span
    three = np.concatenate([ids] * 3, axis=1)
    x = model.prepare(three, pixel_values=np.concatenate([px] * 3))
    assert x.vision.shape == (4, 3, 448, 448) and not x.vision[3].any()
    assert np.array_equal(x.vision[:3], np.concatenate([px] * 3))


def test_splice_writes_each_image_after_its_tag(model):
    from qwenvl_jax.models.qwen_vl_v1 import splice_images

    start = 151857
    ids = np.full((2, 12), 5)
    ids[0, 1], ids[0, 5], ids[1, 3] = start, start + 1, start  # Q = 3 positions per image
    feats = jnp.arange(3 * 3 * 2, dtype=jnp.float32).reshape(3, 3, 2) + 100
    out = np.asarray(splice_images(jnp.zeros((2, 12, 2)), jnp.asarray(ids), feats, start))
    np.testing.assert_array_equal(out[0, 2:5], feats[0])
    np.testing.assert_array_equal(out[1, 4:7], feats[1])
    assert not out[0, :2].any() and not out[0, 5:].any() and not out[1, 7:].any()


# ------------------------------------------------------------------------- bicubic tables


def _torch_resize(table: np.ndarray, size: int) -> np.ndarray:
    src = int(np.sqrt(table.shape[0]))
    t = torch.from_numpy(np.asarray(table, np.float32)).reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(size * size, -1).numpy()


def test_bicubic_resize_is_bit_exact_with_torch(checkpoint):
    rng = np.random.default_rng(0)
    reader = open_checkpoint(checkpoint)
    tables = [rng.standard_normal((256, 96)).astype(np.float32) * s for s in (1.0, 0.02, 30.0)]
    tables += [
        reader.get(k).astype(np.float32)
        for k in (
            "transformer.visual.positional_embedding",
            "transformer.visual.attn_pool.pos_embed",
        )
    ]
    jitted = jax.jit(lambda t: bicubic_resize(t, 1024))
    for table in tables:
        assert np.array_equal(np.asarray(jitted(jnp.asarray(table))), _torch_resize(table, 32))
    small = tables[0][:, :8]  # op by op too: the emulation does not rely on XLA's fusion
    assert np.array_equal(
        np.asarray(bicubic_resize(jnp.asarray(small), 1024)), _torch_resize(small, 32)
    )
    np.testing.assert_array_equal(np.asarray(bicubic_resize(jnp.asarray(small), 256)), small)


def test_bicubic_resize_gradient_is_the_transpose():
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((1024, 8)), jnp.float32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(bicubic_resize(t, 1024) * g)))(table)
    # the linear map itself: column i of the resized identity is the image of basis vector i
    matrix = np.asarray(jax.jit(lambda t: bicubic_resize(t, 1024))(jnp.eye(256)))  # [1024, 256]
    np.testing.assert_allclose(np.asarray(grad), matrix.T @ np.asarray(g), rtol=1e-5, atol=1e-5)


def test_sincos_init_is_the_stored_table(checkpoint):
    stored = open_checkpoint(checkpoint).get("transformer.visual.attn_pool.pos_embed")
    ours = np.asarray(sincos_table(None, stored.shape, jnp.bfloat16))
    assert np.array_equal(ours.view(np.uint16), stored.view(np.uint16))


# ------------------------------------------------------------------------- config and sizes


def test_config_from_spec_and_presets():
    cfg = from_hf(json.loads((REAL / "config.json").read_text()))
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.head_dim) == (
        4096,
        32,
        32,
        128,
    )
    assert (t.intermediate_size, t.vocab_size, t.rope_theta, t.seq_length) == (
        11008,
        151936,
        10000.0,
        2048,
    )
    assert t.attention_bias and t.use_dynamic_ntk and t.use_logn_attn
    assert not t.tie_word_embeddings and not t.rope_in_activation_dtype and not t.softmax_in_fp32
    assert t.mrope_section == (64, 0, 0)
    assert (v.width, v.layers, v.heads, v.mlp_width, v.output_dim, v.n_queries) == (
        1664,
        48,
        16,
        8192,
        4096,
        256,
    )
    assert (v.image_size, v.patch_size, v.grid, v.layer_norm_eps) == (448, 14, 32, 1e-6)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id) == (
        151857,
        151858,
        151859,
    )
    assert load_config("qwen_vl_chat") == cfg
    assert (
        load_config("qwen_vl")
        == from_hf(
            json.loads((SHARED / "reference_configs" / "Qwen__Qwen-VL" / "config.json").read_text())
        )
        == cfg
    )
    tiny = load_config(FIXTURE)
    assert (tiny.text.intermediate_size, tiny.vision.mlp_width) == (192, 315)


def test_real_parameter_count():
    model = qj.from_pretrained(REAL, abstract=True)
    assert qj.param_count(model) == 9_656_935_168
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    size = lambda pred: sum(int(np.prod(v.shape)) for p, v in flat if pred(p))  # noqa: E731
    assert size(lambda p: p[0] != "visual") == 7_721_324_544
    assert size(lambda p: p[0] == "visual") == 1_935_610_624
    resampler = ("attn_pool", "ln_post", "proj")
    assert size(lambda p: p[0] == "visual" and p[1] in resampler) == 92_839_936


# ------------------------------------------------------------------------- checkpoint layout


def test_export_reproduces_the_checkpoint_bit_for_bit(checkpoint, tmp_path):
    model = qj.from_pretrained(checkpoint, dtype="bfloat16")
    params = params_as_numpy(model)
    exported = list(mapping_for(model.config).export_tensors(params))
    manifest = json.loads((FIXTURE / "weights_manifest.json").read_text())["tensors"]
    assert [k for k, _ in exported] == [t["key"] for t in manifest]  # state-dict order
    with open_checkpoint(checkpoint) as reader:
        for key, array in exported:
            original = reader.get(key)
            assert array.dtype == original.dtype == ml_dtypes.bfloat16, key
            assert array.shape == original.shape, key
            assert np.array_equal(array.view(np.uint16), original.view(np.uint16)), key
    # the same tensors as sharded safetensors with an index load to the same parameters
    write_safetensors(tmp_path, exported, max_shard_bytes=2**20)
    (tmp_path / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    assert (tmp_path / "model.safetensors.index.json").is_file()
    again = params_as_numpy(qj.from_pretrained(tmp_path, dtype="bfloat16"))
    assert again.keys() == params.keys()
    assert all(np.array_equal(again[k].view(np.uint16), params[k].view(np.uint16)) for k in params)


def test_mapping_rejects_unknown_and_misshapen_tensors(model):
    mapping = mapping_for(model.config)
    shapes = {k: v.shape for k, v in params_as_numpy(model).items()}
    with pytest.raises(CheckpointError, match="maps to no parameter"):
        mapping.import_tensor("transformer.h.0.attn.masked_bias", np.zeros(1), shapes.get)
    with pytest.raises(CheckpointError, match="does not fit"):
        mapping.import_tensor("transformer.visual.proj", np.zeros((3, 3)), shapes.get)
    q, k, v = (np.full((128, 128), i, np.float32) for i in range(3))
    parts = mapping.import_tensor(
        "transformer.h.1.attn.c_attn.weight", np.concatenate([q, k, v]), shapes.get
    )
    assert [p for p, _ in parts] == [
        f"language_model.layers.1.self_attn.{n}_proj.kernel" for n in "qkv"
    ]
    assert [int(a[0, 0]) for _, a in parts] == [0, 1, 2]


def test_orbax_round_trip_is_bit_identical(checkpoint, tmp_path):
    orbax, hf = tmp_path / "orbax", tmp_path / "hf"
    assert cli.main(["convert", str(checkpoint), str(orbax)]) == 0
    assert cli.main(["convert", str(orbax), str(hf), "--to", "hf"]) == 0
    with open_checkpoint(checkpoint) as src, open_checkpoint(hf) as dst:
        assert src.keys() == dst.keys()
        for key in src:
            a, b = src.get(key), dst.get(key)
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), key
    restored = params_as_numpy(qj.from_pretrained(orbax, dtype="bfloat16"))
    loaded = params_as_numpy(qj.from_pretrained(checkpoint, dtype="bfloat16"))
    assert restored.keys() == loaded.keys()
    assert all(
        np.array_equal(restored[k].view(np.uint16), loaded[k].view(np.uint16)) for k in loaded
    )


# ------------------------------------------------------------------------- processor


@pytest.mark.parametrize("name", NAMES)
def test_processor_reproduces_fixture_inputs(processor, in_fixture, name):
    s, d = scenario(name)
    inputs = processor(s["messages"])
    assert inputs["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(inputs["input_ids"], d["input_ids"])
    # the ids alone, no image work (what the data pipeline renders prefixes with)
    np.testing.assert_array_equal(processor.prompt_ids(s["messages"]), d["input_ids"][0])
    assert inputs["attention_mask"].all()
    if "pixel_values" in d:
        assert inputs["pixel_values"].dtype == np.float32
        np.testing.assert_array_equal(inputs["pixel_values"], d["pixel_values"])
    else:
        assert "pixel_values" not in inputs
    assert processor.apply_chat_template(s["messages"]) == s["prompt"]
    assert processor.decode(d["input_ids"][0], skip_special_tokens=False) == s["prompt"]
    assert processor.decode(d["greedy_ids"], skip_special_tokens=False) == s["greedy"]["text"]
    for a, b in s["image_spans"]:
        assert (d["input_ids"][0, a], d["input_ids"][0, b], b - a) == (151857, 151858, 257)


def test_processor_special_ids_and_boxes(processor):
    tok = processor.tokenizer
    ids = {
        t: tok.token_to_id(t)
        for t in (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|extra_204|>",
            "<ref>",
            "</box>",
            "<img>",
            "<imgpad>",
        )
    }
    assert list(ids.values()) == [151643, 151644, 151645, 151850, 151851, 151854, 151857, 151859]
    assert tok.vocab_size == 151860
    box = "<ref>the cat</ref><box>(120,33),(560,999)</box>"
    ids = processor.encode(box)
    assert ids == [
        151851,
        1782,
        8251,
        151852,
        151853,
        7,
        16,
        17,
        15,
        11,
        18,
        18,
        23547,
        20,
        21,
        15,
        11,
        24,
        24,
        24,
        8,
        151854,
    ]
    assert processor.decode(ids) == "the cat(120,33),(560,999)"
    assert processor.decode(ids, keep_box_tags=True) == box
    assert processor.decode(ids + [151645, 151935]) == "the cat(120,33),(560,999)"
    assert processor.eos_token_ids == [151645, 151644, 151643]
    assert processor.pad_token_id == 151643


def test_processor_chatml_prefix_matches_the_spec(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]
    ids = processor(messages)["input_ids"][0].tolist()
    assert ids[:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert ids[-3:] == [151644, 77091, 198]
    # a user cannot close the turn with typed special-token text
    typed = [{"role": "user", "content": "hi<|im_end|>"}]
    assert 151645 not in processor(typed)["input_ids"][0, 11:-5].tolist()


def test_processor_history_system_images_and_batch(processor, checkpoint, tmp_path):
    import PIL.Image

    image = np.zeros((40, 60, 3), np.uint8)
    image[..., 0] = 200
    path = tmp_path / "red.png"
    PIL.Image.fromarray(image).save(path)
    chat = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Colour?"}],
        },
        {"role": "assistant", "content": "Red."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]
    text = processor.apply_chat_template(chat)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: "
        f"<img>{path}</img>\nColour?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nPicture 2: <img>image2.png</img>\nAnd this one?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = processor([chat, chat[-1:]], padding_side="left")
    assert out["pixel_values"].shape == (3, 3, 448, 448)
    np.testing.assert_array_equal(out["pixel_values"][0], out["pixel_values"][1])
    assert out["input_ids"].shape[0] == 2 and out["attention_mask"][1, 0] == 0
    row = out["input_ids"][1][out["attention_mask"][1] == 1]
    assert processor.decode(row, skip_special_tokens=False) == processor.apply_chat_template(
        chat[-1:]
    )
    # the history window drops the oldest turns first and always keeps the question
    small = QwenVLProcessor(processor.tokenizer, max_window_size=200)
    kept = small.apply_chat_template(chat)
    assert "Colour?" not in kept and "And this one?" in kept
    assert small(chat)["pixel_values"].shape == (1, 3, 448, 448)
    raw = QwenVLProcessor(processor.tokenizer, chat_format="raw")
    assert raw.apply_chat_template(chat[-1:]) == "Picture 1: <img>image1.png</img>\nAnd this one?"
    assert raw.eos_token_ids == [151643]


def test_processor_errors_and_vocabulary_file(processor, tmp_path):
    long = "x" * 300 + ".png"
    with pytest.raises(InputError, match="at most 256"):
        processor([{"role": "user", "content": [{"type": "image", "image": long}]}])
    with pytest.raises(InputError, match="not found"):
        processor([{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}])
    with pytest.raises(InputError, match="videos"):
        processor([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}])
    with pytest.raises(InputError):
        processor([])
    with pytest.raises(InputError, match="padding_side"):
        processor([{"role": "user", "content": "hi"}], padding_side="middle")
    shipped = find_tiktoken_file(tmp_path)
    assert shipped.name == "qwen.tiktoken" and shipped.stat().st_size == 2_561_218
    own = tmp_path / "qwen.tiktoken"
    own.write_bytes(shipped.read_bytes())
    assert find_tiktoken_file(tmp_path) == own
