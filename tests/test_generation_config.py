"""Sampling defaults from the checkpoint's generation_config.json, as transformers takes them.

- The merge (argument > generation_config.json > transformers' defaults) equals transformers'
  own `_prepare_generation_config` for every released generation_config.json.
- The repetition penalty equals transformers' RepetitionPenaltyLogitsProcessor on a left-padded
  batch (the padding left out, every other id of the prompt counted).
- Greedy decoding with a folder's defaults (do_sample false, repetition_penalty 1.05) equals
  transformers' `generate()` with its defaults, token for token, for every family; Qwen-VL v1,
  whose reference is the original remote code (not runnable here), against the penalty processor
  applied step by step to full forwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwenvl_jax as qj
from qwenvl_jax.errors import ConfigError, InputError
from qwenvl_jax.inference.generate import Generator, sampling_settings
from qwenvl_jax.inference.sampling import SamplingMode, mark_seen, penalize, sample
from tests.checkpoints import (
    REFERENCE_CONFIGS,
    load_hf,
    make_checkpoint,
    v1_checkpoint,
    v1_scenarios,
)
from tests.hf_models import hf_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
NEW_TOKENS = 24
PENALIZED = {"do_sample": False, "repetition_penalty": 1.05}  # written into generation_config.json
SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
RELEASED = sorted(REFERENCE_CONFIGS.glob("*/generation_config.json"))


# ------------------------------------------------------------------------------ the merge


def hf_settings(file: dict, **given) -> tuple:
    """What transformers' generate() runs with: its model's generation_config read from `file`,
    merged with the arguments by `_prepare_generation_config`."""
    from transformers import GenerationConfig

    model = hf_model("qwen2_vl")
    model.generation_config = GenerationConfig.from_dict(dict(file))
    config, _ = model._prepare_generation_config(None, **given)
    return tuple(getattr(config, k) for k in SETTINGS)


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.parent.name)
def test_defaults_are_merged_as_transformers_merges_them(path):
    file = json.loads(path.read_text())
    ours = sampling_settings(file)
    assert tuple(ours) == hf_settings(file)
    given = dict(do_sample=True, temperature=0.5, top_k=7, top_p=0.9, repetition_penalty=1.2)
    assert tuple(sampling_settings(file, **given)) == hf_settings(file, **given)
    assert tuple(sampling_settings(file, top_k=3)) == hf_settings(file, top_k=3)
    assert sampling_settings(file, do_sample=False).greedy


@pytest.mark.skipif(not RELEASED, reason=f"{REFERENCE_CONFIGS} is missing")
def test_released_files_and_the_given_settings():
    qwen25, qwen3 = (
        json.loads((REFERENCE_CONFIGS / name / "generation_config.json").read_text())
        for name in ("Qwen__Qwen2.5-VL-7B-Instruct", "Qwen__Qwen3-VL-4B-Instruct")
    )
    # Qwen2.5-VL samples at temperature 1e-6 with transformers' top_k 50 and a penalty of 1.05
    assert sampling_settings(qwen25) == (True, 1e-6, 50, 1.0, 1.05)
    assert sampling_settings(qwen3) == (True, 0.7, 20, 0.8, 1.0)
    assert sampling_settings({}) == (False, 1.0, 50, 1.0, 1.0)
    assert sampling_settings({}).greedy and not sampling_settings(qwen3).greedy
    # given settings win; a temperature > 0 given alone asks for sampling, 0 for greedy
    assert sampling_settings(qwen3, temperature=0.0).greedy
    assert sampling_settings(qwen3, top_k=0, top_p=1.0)[2:4] == (0, 1.0)
    assert not sampling_settings(PENALIZED, temperature=0.5).greedy
    assert sampling_settings(PENALIZED, temperature=0.5, do_sample=False).greedy
    assert sampling_settings(qwen25, repetition_penalty=1.0).repetition_penalty == 1.0
    with pytest.raises(InputError, match="repetition_penalty must be > 0"):
        sampling_settings(qwen25, repetition_penalty=0.0)
    with pytest.raises(InputError, match="top_p"):
        sampling_settings({}, top_p=1.5)
    with pytest.raises(ConfigError, match="generation_config.json: top_k"):
        sampling_settings({"top_k": -1})


# ------------------------------------------------------------------------------ the penalty


def test_penalty_equals_hf_processor_on_a_padded_batch():
    """Prompt ids repeated, left padding with a pad id that also occurs as a real token in the
    other row, then two decode steps."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    V, pad = 50, 7
    ids = np.array([[pad, pad, pad, 3, 9, 3, 21], [5, pad, 12, 5, 40, 40, 1]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    seen = mark_seen(jnp.zeros((2, V), bool), jnp.asarray(ids), jnp.asarray(mask) != 0)
    for step in range(3):
        logits = rng.standard_normal((2, V)).astype(np.float32) * 4
        ref = RepetitionPenaltyLogitsProcessor(
            1.3, prompt_ignore_length=torch.as_tensor((mask != 0).argmax(1))
        )(torch.as_tensor(ids), torch.as_tensor(logits)).numpy()
        # jitted with a traced penalty, as in the prefill and decode steps (eagerly, XLA may
        # fold the division by a constant into a multiplication: one ulp apart)
        got = np.asarray(jax.jit(penalize)(jnp.asarray(logits), seen, jnp.float32(1.3)))
        np.testing.assert_array_equal(got, ref)  # the same float32 operations
        assert (got != logits).sum() == len(set(ids[0, 3:])) + len(set(ids[1]))
        mode = SamplingMode.of(0.0, 0, 1.0, 1.3)
        token = sample(jnp.asarray(logits), None, mode, 1.0, 0, 1.0, jnp.float32(1.3), seen)
        assert token.tolist() == ref.argmax(-1).tolist()
        nxt = np.array([pad, 30 + step])  # a padded row's pad id counts once generated
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), mask.dtype)], axis=1)
        seen = mark_seen(seen, jnp.asarray(nxt))


# ------------------------------------------------------------------------------ generate parity


def narrow_vocabulary(folder: Path, keep: set[int]) -> None:
    """Scale every lm_head row but those of `keep` by 0.02: greedy decoding then picks among a
    couple of hundred tokens, many of them in the prompt, so it repeats itself and a 1.05 penalty
    often turns it to another token (a random model over the full vocabulary never repeats)."""
    weights = load_file(folder / "model.safetensors")
    scale = np.full((weights["lm_head.weight"].shape[0], 1), 0.02, np.float32)
    scale[sorted(keep)] = 1.0
    weights["lm_head.weight"] = weights["lm_head.weight"] * scale
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def picture(folder: Path, size: tuple[int, int]) -> str:
    from PIL import Image

    rng = np.random.default_rng(3)
    w, h = size
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(folder / "pic.png")
    return str(folder / "pic.png")


SONG = "la la la, do re mi."


@pytest.fixture(scope="module", params=FAMILIES)
def penalized(request, tmp_path_factory):
    """A tiny checkpoint whose generation_config.json asks for greedy decoding with a 1.05
    repetition penalty, its models and a batch of two conversations (an image; text only)."""
    family = request.param
    folder = make_checkpoint(family, tmp_path_factory.mktemp(family), generation=PENALIZED)
    processor = qj.Processor.from_pretrained(folder)
    size = (512, 256) if family.startswith("qwen3") else (100, 70)
    image = picture(tmp_path_factory.mktemp("media"), size)
    batch = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": SONG}],
            }
        ],
        [{"role": "user", "content": f"Say it again and again: {SONG}"}],
    ]
    prompt = set(processor(batch)["input_ids"].ravel().tolist())
    stop = {*processor.eos_token_ids, processor.image_token_id, processor.video_token_id}
    narrow_vocabulary(folder, (prompt - stop) | set(range(1000, 1700, 7)))
    return {
        "model": qj.from_pretrained(folder, dtype="float32"),
        "processor": processor,
        "hf": load_hf(folder, family),
        "batch": batch,
    }


def hf_generate(hf, processor, batch, **kw) -> list[list[int]]:
    """transformers' generate() with the model's generation_config (the folder's file) and `kw`:
    the new ids of each row, cut after the first stop id."""
    inputs = processor(batch, padding_side="left")
    with torch.no_grad():
        out = hf.generate(
            **{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()},
            max_new_tokens=NEW_TOKENS,
            **kw,
        )
    stop = processor.eos_token_ids
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:end])
    return rows


def test_greedy_defaults_match_hf_generate(penalized):
    model, processor, hf, batch = (penalized[k] for k in ("model", "processor", "hf", "batch"))
    assert (hf.generation_config.do_sample, hf.generation_config.repetition_penalty) == (
        False,
        1.05,
    )
    ref = hf_generate(hf, processor, batch)  # transformers' defaults: the file's
    with jax.default_matmul_precision("highest"):
        out = qj.generate(model, processor, batch, max_new_tokens=NEW_TOKENS)
        plain = qj.generate(
            model, processor, batch, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0
        )
    assert [len(r) for r in ref] == [NEW_TOKENS] * 2
    assert [o.token_ids for o in out] == ref
    # the given penalty wins over the file's, in both implementations
    assert [o.token_ids for o in plain] == hf_generate(hf, processor, batch, repetition_penalty=1.0)
    lengths = processor(batch)["attention_mask"].sum(axis=1)
    assert lengths[0] != lengths[1]  # the shorter row is padded
    # plain greedy decoding repeats tokens, and the penalty changes what it picks
    changed = [
        len(set(p.token_ids)) < len(p.token_ids) and p.token_ids != o.token_ids
        for o, p in zip(out, plain)
    ]
    assert any(changed), [p.token_ids for p in plain]


@pytest.mark.parametrize("penalized", ["qwen2_vl"], indirect=True)
def test_greedy_without_penalty_carries_no_seen_mask(penalized):
    """Whether the penalty is on is static: plain greedy decoding compiles the programs it did
    before the penalty existed, whose decode step takes no bool[B, vocab] mask of seen ids."""
    model, processor, batch = penalized["model"], penalized["processor"], penalized["batch"]
    qj.generate(model, processor, batch, max_new_tokens=2, repetition_penalty=1.0)
    qj.generate(model, processor, batch, max_new_tokens=2)
    vocab = model.config.text.vocab_size
    penalties = set()
    for name, static, (_, leaves) in Generator._programs:
        if name == "_decode":
            mode = dict(static)["mode"]
            masks = [s for s, dtype, _ in leaves if dtype == np.bool_ and s[-1:] == (vocab,)]
            assert len(masks) == mode.penalty
            penalties.add(mode.penalty)
    assert penalties == {False, True}


# ------------------------------------------------------------------------------ Qwen-VL v1


def test_qwen_vl_v1_penalty_matches_hf_processor_step_by_step(tmp_path_factory, tmp_path):
    """The v1 reference is the original remote code, which does not run here: qj.generate with
    the folder's defaults (greedy, penalty 1.05) against full forwards of the prompt and the
    tokens so far, each step's logits through transformers' RepetitionPenaltyLogitsProcessor,
    then argmax."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    source = v1_checkpoint(tmp_path_factory)
    folder = tmp_path / "qwen_vl_v1"
    folder.mkdir()
    for f in source.iterdir():
        if f.name != "generation_config.json":
            (folder / f.name).symlink_to(f)
    file = json.loads((source / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**file, **PENALIZED}))
    model = qj.from_pretrained(folder, dtype="float32")
    processor = qj.Processor.from_pretrained(folder)
    s = next(s for s in v1_scenarios() if s["name"] == "astronaut_what")
    with jax.default_matmul_precision("highest"):
        out = qj.generate(model, processor, s["messages"], max_new_tokens=NEW_TOKENS)
        inputs = processor(s["messages"])
        T = inputs["input_ids"].shape[1]
        ids = np.pad(
            inputs["input_ids"], ((0, 0), (0, NEW_TOKENS)), constant_values=processor.pad_token_id
        )
        mask = np.zeros_like(ids)
        penalty = RepetitionPenaltyLogitsProcessor(1.05)
        for t in range(T, T + NEW_TOKENS):
            mask[:, :t] = 1
            logits = np.asarray(model(ids, mask, inputs["pixel_values"]))[:, t - 1]
            scores = penalty(torch.tensor(ids[:, :t]), torch.tensor(logits))
            ids[0, t] = int(scores.argmax(-1))
    ref = ids[0, T:].tolist()
    assert out.token_ids == ref
    greedy = s["greedy"]["token_ids"]  # the original code's plain greedy continuation
    assert len(set(greedy)) < len(greedy) and ref != greedy
