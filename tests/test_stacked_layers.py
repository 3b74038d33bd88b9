"""Decoder layers stacked by construction and scanned, one scan per group of a repeating layer
pattern: the same logits, losses and gradients as running the layers one by one (float32, 1e-5
relative), for every family and a deeper hybrid Qwen3.5 (remat under the scan:
tests/test_train_step.py); a compiled program whose size and number of loops do not grow with the
depth; and checkpoints that keep one entry per layer."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import load_config
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading import orbax_io
from qwenvl_jax.loading.stacking import checkpoint_view
from qwenvl_jax.modeling import build_model, from_pretrained, params_as_numpy
from qwenvl_jax.models import build
from qwenvl_jax.models import text as text_model
from qwenvl_jax.models.text import TextModel, layer_runs
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train.config import from_dict
from qwenvl_jax.train.freeze import path_str
from qwenvl_jax.train.step import Trainer, batch_to_model_inputs
from qwenvl_jax.train.synthetic import SyntheticBatches

FAMILIES = ["tiny_qwen_vl", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]
FAMILIES += ["tiny_qwen3_vl_moe", "hybrid_9"]
HYBRID = ("linear_attention",) * 3 + ("full_attention",)


def _with_layers(cfg, n):
    types = (HYBRID * n)[:n] if cfg.text.layer_types else ()  # Qwen3.5's released pattern
    text = dataclasses.replace(cfg.text, num_hidden_layers=n, layer_types=types)
    return dataclasses.replace(cfg, text=text)


def _config(name):
    """A shipped config, or "hybrid_N": tiny Qwen3.5 with N layers of the released pattern
    (N = 9: the pattern twice, a group of period 4, then one linear layer, a group of its own;
    dense rather than MoE for CI time: the MoE's scan is tiny_qwen3_vl_moe's)."""
    if name.startswith("hybrid_"):
        return _with_layers(load_config("tiny_qwen3_5"), int(name[7:]))
    return load_config(name)


def per_layer_call(
    self,
    embeds,
    position_ids,
    segment_ids,
    *,
    slots=None,
    cache=None,
    cache_index=None,
    deepstack=None,
    ntk_alpha=1.0,
):
    """The reference: `TextModel.__call__` as a Python loop over the layers, each layer a
    module of its own made of its slice of the stacked parameters (no scan, no cache)."""
    assert cache is None
    B, T, _ = embeds.shape
    x = embeds.astype(self.dtype)
    angles = self.rope(position_ids, ntk_alpha)
    slots = jnp.broadcast_to(jnp.arange(T), (B, T)) if slots is None else slots
    layers = {}
    for layer_ids, run in zip(layer_runs(self.cfg), self.runs, strict=True):
        graphdef, state = nnx.split(run)
        for j, i in enumerate(layer_ids):
            layers[i] = nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
    assert sorted(layers) == list(range(self.cfg.num_hidden_layers))
    router = []
    for i in range(self.cfg.num_hidden_layers):
        x, _, rl = layers[i](x, angles, segment_ids, slots, None, None, 0)
        if deepstack is not None and i < deepstack.shape[0]:
            x = x + deepstack[i].astype(x.dtype)
        if rl is not None:
            router.append(rl)
    return self.norm(x), None, router


@functools.cache
def mesh():
    return make_mesh(devices=jax.devices()[:1])


def _outputs(trainer, batch):
    """(logits, loss, {path: gradient}) in one compiled program."""
    ids, seg, pos, vision = batch_to_model_inputs(batch)

    def run(params):
        model = nnx.merge(trainer.graphdef, params, trainer.frozen)
        logits = model.forward(ids, seg, pos, vision)[0]
        loss, grads = jax.value_and_grad(lambda p: trainer.loss(p, trainer.frozen, batch)[0])(
            params
        )
        return logits, loss, grads

    logits, loss, grads = jax.jit(run)(trainer._initial_params)
    flat = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    return np.asarray(logits), float(loss), flat


DECAY = re.compile(r"linear_attn\.(A_log|dt_bias|in_proj_a\.)")


def _run(path):
    return re.match(r"language_model\.runs\.\d+\.", path) and path.split(".")[2]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("name", FAMILIES)
def test_scanned_layers_equal_the_per_layer_loop(name, monkeypatch):
    cfg = _config(name)
    base = build_model(cfg, mesh=mesh(), dtype="float32")
    graphdef, weights = nnx.split(base)
    host = jax.device_get(weights)
    batch = next(SyntheticBatches(cfg, 2, 48, seed=3))
    out = {}
    for mode in ("scan", "per_layer"):
        model = nnx.merge(graphdef, jax.device_put(host))
        trainer = Trainer(model, from_dict({"freeze": [[".*", "train"]]}), mesh())
        with monkeypatch.context() as m:
            if mode == "per_layer":
                m.setattr(TextModel, "__call__", per_layer_call)
            out[mode] = _outputs(trainer, trainer.put_batch(batch))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = out["scan"], out["per_layer"]
    assert any("runs" in p for p in ref_grads)
    assert _rel(logits, ref_logits) < 1e-5
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for p, g in grads.items():
        if DECAY.search(p):
            # The delta rule's decay parameters sum many cancelling terms (tests/test_deltanet.py):
            # their gradients are under a thousandth of the run's others, and float32 rounding
            # is measured against the run's gradient scale.
            scale = max(np.abs(v).max() for q, v in ref_grads.items() if _run(q) == _run(p))
            assert np.abs(g - ref_grads[p]).max() / scale < 1e-5, p
        else:
            assert _rel(g, ref_grads[p]) < 1e-5, p


def test_parameters_are_stacked_per_run_with_a_layers_axis():
    cfg = load_config("tiny_qwen3_vl_moe")  # layer 1 is dense (mlp_only_layers), 0 and 2 MoE
    assert layer_runs(cfg.text) == [range(0, 1), range(1, 2), range(2, 3)]
    model = build_model(cfg, abstract=True)
    q = model.language_model.runs[0].self_attn.q_proj.kernel
    assert q.get_metadata()["sharding_axes"] == ("layers", "embed", "heads")
    assert hasattr(model.language_model.runs[0].mlp, "gate_up_proj")
    assert hasattr(model.language_model.runs[1].mlp, "gate_proj")
    dense = load_config("tiny_qwen2_vl")
    runs = build_model(dense, abstract=True).language_model.runs
    assert len(runs) == 1
    assert runs[0].mlp.up_proj.kernel.shape[0] == dense.text.num_hidden_layers
    # checkpoints and the mapping tables see one entry per layer, Hugging Face's numbering
    view = orbax_io.flat_params(model)
    assert not any(".runs." in p for p in view)
    assert (
        view["language_model.layers.1.mlp.gate_proj.kernel"].shape
        == (model.language_model.runs[1].mlp.gate_proj.kernel.shape[1:])
    )


def _lowered(model, T=16):
    """The forward pass's lowered program (StableHLO text)."""
    ids = jnp.zeros((1, T), jnp.int32)
    seg = jnp.ones((1, T), jnp.int32)
    pos = jnp.zeros((3, 1, T), jnp.int32)
    fwd = jax.jit(lambda m: m.forward(ids, seg, pos, None)[0])
    return fwd.lower(model).as_text()


def _instructions(text):
    return len(re.findall(r"^\s*(?:%\S+ = |\S+ = )", text, flags=re.M))


def _hlo_instructions(model, T=16):
    return _instructions(_lowered(model, T))


def test_compiled_program_does_not_grow_with_depth(monkeypatch):
    cfg = load_config("tiny_qwen2_vl")
    sizes = {n: _hlo_instructions(build_model(_with_layers(cfg, n), abstract=True)) for n in (2, 8)}
    assert sizes[8] <= sizes[2] * 1.02 + 8, sizes
    # the per-layer loop, for contrast, grows with every layer
    monkeypatch.setattr(TextModel, "__call__", per_layer_call)
    loop = {n: _hlo_instructions(build_model(_with_layers(cfg, n), abstract=True)) for n in (2, 8)}
    assert loop[8] > loop[2] * 2, loop


def _runs_of_one_kind(cfg):
    """Groups of period 1, one per run of consecutive layers of one kind (one scan each)."""
    kinds = [text_model.layer_kind(cfg, i) for i in range(cfg.num_hidden_layers)]
    starts = [i for i in range(len(kinds)) if i == 0 or kinds[i] != kinds[i - 1]]
    ends = [*starts[1:], len(kinds)]
    return tuple(text_model.LayerGroup(lo, 1, hi - lo) for lo, hi in zip(starts, ends))


def test_hybrid_decoder_runs_one_scan_whatever_the_depth(monkeypatch):
    """Qwen3.5's pattern (three linear layers, one full) is one group of period 4: the forward
    pass has as many loops (scans over layers, and the delta rule's over chunks) and about as many
    instructions at 16 layers as at 8."""
    cfg = load_config("tiny_qwen3_5")
    assert text_model.layer_groups(_with_layers(cfg, 24).text) == ((0, 4, 6),)
    texts = {n: _lowered(build_model(_with_layers(cfg, n), abstract=True)) for n in (8, 16)}
    loops = {n: t.count("stablehlo.while") for n, t in texts.items()}
    sizes = {n: _instructions(t) for n, t in texts.items()}
    assert loops[16] == loops[8], loops
    assert sizes[16] <= sizes[8] * 1.02 + 8, sizes
    # a scan per run of one layer kind, for contrast, has a loop for every run (8 at 16 layers)
    monkeypatch.setattr(text_model, "layer_groups", _runs_of_one_kind)
    monkeypatch.setattr(build, "_initializer", build._initializer.__wrapped__)  # not the cached
    runs = _lowered(build_model(_with_layers(cfg, 16), abstract=True)).count("stablehlo.while")
    assert runs >= loops[16] + 7, (runs, loops)


def test_checkpoint_folder_keeps_one_entry_per_layer(tmp_path):
    cfg = load_config("tiny_qwen3_vl_moe")
    model = build_model(cfg, seed=1)
    params = params_as_numpy(model)
    orbax_io.save_model(model, tmp_path / "a", config=cfg.to_dict(), chunk_bytes=2**16)
    stored = orbax_io.stored_params(tmp_path / "a")
    assert stored.keys() == params.keys()
    assert "language_model.layers.2.mlp.gate_up_proj" in stored
    again = params_as_numpy(from_pretrained(tmp_path / "a", dtype="float32"))
    assert all(np.array_equal(again[k], params[k]) for k in params)
    # a folder that lacks one layer's tensor is refused with a one-line reason naming it
    params.pop("language_model.layers.1.self_attn.k_proj.kernel")
    orbax_io.save_model(params, tmp_path / "b", config=cfg.to_dict(), family=cfg.family)
    with pytest.raises(CheckpointError, match=r"lacks parameter language_model\.layers\.1\."):
        from_pretrained(tmp_path / "b", dtype="float32")


def test_checkpoint_view_unstacks_in_layer_order():
    cfg = load_config("tiny_qwen2_vl")
    n = cfg.text.num_hidden_layers
    flat = {
        "language_model.runs.0.a.kernel": np.arange(n)[:, None] * np.ones((1, 3)),
        "language_model.runs.0.b.weight": np.arange(n) * 10.0,
        "lm_head.kernel": np.zeros(2),
    }
    view = checkpoint_view(flat, cfg)
    names = [f"language_model.layers.{i}.{p}" for i in range(n) for p in ("a.kernel", "b.weight")]
    assert list(view) == [*names, "lm_head.kernel"]
    assert view[f"language_model.layers.{n - 1}.b.weight"] == (n - 1) * 10.0


@pytest.mark.parametrize("name", ["tiny_qwen2_5_vl", "tiny_qwen3_vl_moe", "hybrid_9"])
def test_one_run_per_layer_is_the_same_model(name):
    """The CPU decoding layout (each layer its own group of one, `one_run_per_layer`) gives the
    stacked model's logits and cache (k/v, and the delta rule's conv and recurrent states of a
    hybrid decoder's group of period 4) after a prefill and a decoding step (to float32
    rounding: the compiler fuses a loop body and straight-line code differently), and leaves the
    stacked model as it was."""
    from qwenvl_jax.inference.generate import Generator
    from qwenvl_jax.models.text import KVCache, one_run_per_layer

    config = _config(name)
    model = build_model(config, seed=1)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.language_model.runs))]
    view = one_run_per_layer(model)
    L = config.text.num_hidden_layers
    assert view.language_model.groups == tuple((i, 1, 1) for i in range(L))
    assert len(model.language_model.runs) == len(layer_runs(config.text))
    ids = (np.arange(24)[None] * 7) % 90 + 10
    seg = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(24), (3, 1, 24))

    def run(m):
        text = m.config.text
        cache = KVCache.empty(text, 1, 32, jnp.float32)
        logits, cache, _ = m.forward(ids, seg, pos, cache=cache, cache_index=0)
        step, cache, _ = m.forward(
            ids[:, :1], seg[:, :1], pos[:, :, :1] + 24, cache=cache, cache_index=24
        )
        return (np.asarray(logits), np.asarray(step)), jax.tree.map(np.asarray, cache)

    with jax.default_matmul_precision("highest"):
        (a, ca), (b, cb) = run(model), run(view)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
    after = jax.tree.leaves(nnx.state(model.language_model.runs))
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, np.asarray(y))
    # the generator makes the copy once and again only when the weights change
    gen = Generator.for_model(model)
    first = gen.running_model()
    assert gen.running_model() is first
    assert len(first.language_model.runs) == L
