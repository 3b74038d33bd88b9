"""The training loss: token cross-entropy over the loss mask plus the MoE load-balancing loss,
and its gradients, against transformers' training loss on tiny random models (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import build_inputs, hf_model

import qwenvl_jax as qj
from qwenvl_jax.data.batch import vision_fields
from qwenvl_jax.loading.stacking import checkpoint_view
from qwenvl_jax.models.vision_inputs import stack_groups
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.freeze import path_str
from qwenvl_jax.train.step import Trainer, chunked_cross_entropy, cross_entropy


def test_cross_entropy_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) < 0.6).astype(np.float32)
    total, count = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    assert float(count) == mask.sum()


@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 0])
def test_chunked_cross_entropy_equals_the_whole_batch_loss_and_gradients(chunk):
    """The loss maps hidden states to logits a chunk of positions at a time (13 positions: the
    last chunk padded); the sum, the count and the gradients (of the hidden states and of the
    output projection) equal those of the whole batch's logits at once."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((3, 13, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 21)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 21, (3, 13)))
    mask = jnp.asarray(rng.random((3, 13)) < 0.7, jnp.float32)

    def whole(h, w):
        return cross_entropy(h @ w, targets, mask)

    def chunked(h, w):
        return chunked_cross_entropy(lambda x: x @ w, h, targets, mask, chunk)

    (t0, c0), (t1, c1) = whole(hidden, w), chunked(hidden, w)
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-6)
    assert float(c1) == float(c0) == float(mask.sum())
    g0 = jax.grad(lambda h, w: whole(h, w)[0], argnums=(0, 1))(hidden, w)
    g1 = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, w)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_chunked_loss_keeps_only_a_chunk_of_logits():
    """Compiled, the chunked loss's largest temporary is a chunk of logits, not the batch's."""
    hidden = jax.ShapeDtypeStruct((2, 4096, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 8192), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, 4096), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, 4096), jnp.float32)

    def temp_bytes(chunk):
        def loss(h, w, t, m):
            return chunked_cross_entropy(lambda x: x @ w, h, t, m, chunk)[0]

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step.lower(hidden, w, targets, mask).compile().memory_analysis().temp_size_in_bytes

    whole_logits = 2 * 4096 * 8192 * 4  # float32 logits of the batch
    chunk_logits = whole_logits // 8
    whole, chunked = temp_bytes(0), temp_bytes(512)
    assert whole >= whole_logits  # the logits and their gradient, whole
    assert chunked < 3 * chunk_logits and chunked < whole / 4  # the same, a chunk's worth


def _hf_batch(ours, inputs, labels):
    """Our batch for one unpadded row whose HF `labels` mark the counted tokens (-100: not)."""
    x = ours.prepare(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    ids = np.asarray(x.input_ids)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    mask = np.zeros(ids.shape, np.float32)
    mask[:, :-1] = labels[:, 1:] != -100
    return {
        "input_ids": ids,
        "segment_ids": np.asarray(x.segment_ids),
        "position_ids": np.asarray(x.position_ids),
        "targets": targets,
        "loss_mask": mask,
        **vision_fields(stack_groups([x.vision])),  # one group: the batch contract
    }


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen2_5_vl"])
def test_loss_and_gradients_match_transformers(family, tmp_path):
    """Cross-entropy over the counted tokens plus the MoE load-balancing loss (coefficient
    router_aux_loss_coef), and its gradients, equal transformers' training loss."""
    ref = hf_model(family, seed=1)
    ref.save_pretrained(tmp_path)
    ours = qj.from_pretrained(tmp_path, dtype="float32")
    inputs = build_inputs(family, [{"text": list(range(20, 44)), "images": [(4, 4)]}], seed=2)
    ids = inputs["input_ids"]
    labels = ids.copy()
    labels[:, :14] = -100  # the prompt does not count
    moe = family == "qwen3_vl_moe"
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    ref.train()  # dropout is 0 in these configs; train mode just enables the aux loss path
    out = ref(**kw, labels=torch.from_numpy(labels), output_router_logits=moe)
    out.loss.backward()

    tc = from_dict({"freeze": [[".*", "train"]], "batch_size": 1, "seq_len": ids.shape[1]})
    trainer = Trainer(ours, tc, make_mesh(devices=jax.devices()[:1]))
    params = trainer._initial_params
    batch = trainer.put_batch(_hf_batch(ours, inputs, labels))
    (loss, aux), grads = jax.jit(
        jax.value_and_grad(lambda p: trainer.loss(p, trainer.frozen, batch), has_aux=True)
    )(params)
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-5)
    coef = ours.config.text.router_aux_loss_coef
    np.testing.assert_allclose(
        float(loss), float(aux["ce"]) + coef * float(aux["aux_loss"]), rtol=1e-6
    )
    if moe:
        assert float(aux["aux_loss"]) > 0.5
        np.testing.assert_allclose(float(aux["aux_loss"]), float(out.aux_loss.detach()), rtol=1e-5)
    g = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    g = checkpoint_view(g, ours.config)  # one entry per layer and ViT block, as HF names them
    named = dict(ref.named_parameters())
    pairs = [
        ("lm_head.kernel", "lm_head.weight"),
        ("visual.blocks.0.attn.qkv.kernel", "model.visual.blocks.0.attn.qkv.weight"),
        (
            "language_model.layers.0.self_attn.q_proj.kernel",
            "model.language_model.layers.0.self_attn.q_proj.weight",
        ),
    ]
    if moe:
        pairs.append(
            (
                "language_model.layers.0.mlp.gate.kernel",
                "model.language_model.layers.0.mlp.gate.weight",
            )
        )
    for ours_name, ref_name in pairs:
        expected = named[ref_name].grad.numpy().T
        err = np.abs(g[ours_name] - expected).max() / np.abs(expected).max()
        assert err < 1e-4, (ours_name, err)
