"""Checkpoint conversion: HF -> Orbax -> HF is bit-identical and loads in transformers with the
same logits; FP8 dequantises; sharded restore; every bad input is exit status 2 and no DST."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, build_inputs, hf_config, hf_logits, hf_model

from qwenvl_jax.cli import main as cli
from qwenvl_jax.errors import CheckpointError
from qwenvl_jax.loading import convert, orbax_io
from qwenvl_jax.loading.reader import open_checkpoint
from qwenvl_jax.loading.writer import write_safetensors
from qwenvl_jax.modeling import from_pretrained, params_as_numpy

ROOT = Path(__file__).resolve().parents[1]
SIDE_FILES = {
    "tokenizer.json": '{"model": "stand-in"}',
    "chat_template.jinja": "{{ messages }}",
    "preprocessor_config.json": '{"patch_size": 14}',
}
PROMPT = {"text": [5, 6, 7, 8, 9, 10], "images": [(4, 4)]}


def _save_hf(model, folder: Path, dtype: torch.dtype = torch.float32, **kw) -> Path:
    model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(folder) as reader:
        return dict(reader.items())


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def _transformers_logits(folder: Path, family: str, dtype: torch.dtype) -> np.ndarray:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()
    return hf_logits(model, build_inputs(family, [PROMPT]))


def _cli(*args: str) -> int:
    return cli(["convert", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory) -> Path:
    return _save_hf(hf_model("qwen3_vl_moe"), tmp_path_factory.mktemp("moe") / "hf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, family, dtype):
    torch_dtype = getattr(torch, dtype)
    src = _save_hf(hf_model(family), tmp_path / "hf", torch_dtype)
    assert _cli(src, tmp_path / "orbax", "--dtype", dtype) == 0
    assert orbax_io.is_orbax_folder(tmp_path / "orbax")
    assert orbax_io.read_marker(tmp_path / "orbax")["dtype"] == dtype
    assert _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf") == 0

    back = tmp_path / "back"
    _assert_bit_identical(_tensors(src), _tensors(back))
    for name, text in SIDE_FILES.items():
        assert (tmp_path / "orbax" / name).read_text() == text
        assert (back / name).read_text() == text
    assert (back / "generation_config.json").is_file()
    config = json.loads((back / "config.json").read_text())
    assert config["dtype"] == dtype and config["model_type"] == family
    np.testing.assert_array_equal(
        _transformers_logits(back, family, torch_dtype),
        _transformers_logits(src, family, torch_dtype),
    )
    if dtype == "bfloat16":  # restored in another dtype: cast on read, as from the HF folder
        _assert_bit_identical(
            params_as_numpy(from_pretrained(src, dtype="float32")),
            params_as_numpy(from_pretrained(tmp_path / "orbax", dtype="float32")),
        )


def test_orbax_restores_the_hf_weights_and_gives_reference_logits(tmp_path, moe_src):
    assert _cli(moe_src, tmp_path / "orbax", "--dtype", "float32") == 0
    from_hf = params_as_numpy(from_pretrained(moe_src, dtype="float32"))
    model = from_pretrained(tmp_path / "orbax", dtype="float32")
    restored = params_as_numpy(model)
    _assert_bit_identical(from_hf, restored)

    inputs = build_inputs("qwen3_vl_moe", [PROMPT])
    want = hf_logits(hf_model("qwen3_vl_moe"), inputs)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model(**inputs))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint folder with its tensors passed through edit(key, array) -> [(k, a)]."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = [(k2, a2) for k, a in _tensors(src).items() for k2, a2 in edit(k, a)]
    write_safetensors(dst, tensors)
    return dst


def test_expert_layouts_round_trip_as_the_source_stored_them(tmp_path, moe_src):
    # save_pretrained (transformers 5) writes experts (E, 2I, H); the hub holds (E, H, 2I).
    assert _tensors(moe_src)["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (
        8,
        96,
        128,
    )

    def to_hub(k, a):
        return [(k, np.ascontiguousarray(np.swapaxes(a, 1, 2)) if "experts" in k else a)]

    hub = _rewrite(moe_src, tmp_path / "hub", to_hub)
    assert _cli(hub, tmp_path / "orbax", "--dtype", "float32") == 0
    assert _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf") == 0
    _assert_bit_identical(_tensors(hub), _tensors(tmp_path / "back"))
    # transformers transposes hub-layout experts on load; its matmuls then round differently.
    want = _transformers_logits(moe_src, "qwen3_vl_moe", torch.float32)
    got = _transformers_logits(tmp_path / "back", "qwen3_vl_moe", torch.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # Without a record of the source (a model saved from training), export uses the hub layout.
    marker = orbax_io.read_marker(tmp_path / "orbax")
    del marker["source"]
    (tmp_path / "orbax" / orbax_io.MARKER_NAME).write_text(json.dumps(marker))
    assert _cli(tmp_path / "orbax", tmp_path / "plain", "--to", "hf") == 0
    _assert_bit_identical(_tensors(hub), _tensors(tmp_path / "plain"))


def test_sharded_torch_bin_source(tmp_path):
    model = hf_model("qwen3_vl")
    src = _save_hf(model, tmp_path / "st")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    (tmp_path / "bin").mkdir()
    shutil.copy(src / "config.json", tmp_path / "bin")
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / "bin" / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    assert _cli(tmp_path / "bin", tmp_path / "orbax", "--dtype", "float32") == 0
    assert (
        _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf", "--max-shard-size", "100KB") == 0
    )
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    _assert_bit_identical(_tensors(src), _tensors(tmp_path / "back"))


V1_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen_vl_v1_tiny"


@pytest.mark.skipif(not V1_FIXTURE.is_dir(), reason="the shared Qwen-VL v1 fixture is missing")
def test_qwen_vl_v1_round_trip_from_sharded_bin(tmp_path):
    src = tmp_path / "src"
    subprocess.run(
        [sys.executable, str(V1_FIXTURE / "materialize.py"), str(src)],
        check=True,
        capture_output=True,
    )
    assert (src / "pytorch_model.bin.index.json").is_file()
    assert _cli(src, tmp_path / "orbax") == 0
    assert orbax_io.read_marker(tmp_path / "orbax")["family"] == "qwen_vl"
    assert _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf") == 0
    back = tmp_path / "back"
    _assert_bit_identical(_tensors(src), _tensors(back))
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # transformers needs the remote code (not distributed) for v1: compare our loads instead.
    ref = params_as_numpy(from_pretrained(src, dtype="float32"))
    for folder in (tmp_path / "orbax", back):
        _assert_bit_identical(ref, params_as_numpy(from_pretrained(folder, dtype="float32")))


def test_converted_folder_serves_the_processor(tmp_path_factory, tmp_path):
    from qwenvl_jax.processing.processor import Processor
    from tests.checkpoints import session_checkpoint

    src = session_checkpoint("qwen2_vl", tmp_path_factory)
    assert _cli(src, tmp_path / "orbax") == 0
    image = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}],
        }
    ]
    want, got = Processor.from_pretrained(src), Processor.from_pretrained(tmp_path / "orbax")
    assert got.apply_chat_template(messages, add_generation_prompt=True) == (
        want.apply_chat_template(messages, add_generation_prompt=True)
    )
    a, b = want(messages), got(messages)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert got.eos_token_ids == want.eos_token_ids


# ----------------------------------------------------------------------------- FP8

BLOCK = (128, 128)


def _quantise(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float32[..., R, C] -> (float8_e4m3fn[..., R, C], scale_inv float32[..., ceil(R/b0),
    ceil(C/b1)]): one scale per block (partial blocks at the edges), amax mapped to 448."""
    (b0, b1), (rows, cols) = block, w.shape[-2:]
    gr, gc = -(-rows // b0), -(-cols // b1)
    scale = torch.empty(*w.shape[:-2], gr, gc)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            rs, cs = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            blk = w[..., rs, cs]
            s = blk.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / 448.0
            scale[..., i, j] = s
            q[..., rs, cs] = (blk / s[..., None, None]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantise(q: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    (b0, b1), (rows, cols) = block, q.shape[-2:]
    full = scale.repeat_interleave(b0, -2)[..., :rows, :].repeat_interleave(b1, -1)[..., :cols]
    return (q.float() * full).to(torch.bfloat16)


def _bf16_numpy(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)


def test_fp8_fused_experts_dequantise_per_expert(tmp_path, moe_src):
    """Qwen3-VL-MoE FP8: fused expert tensors carry one scale grid per expert."""
    from safetensors.torch import save_file

    block = (32, 64)  # several blocks per expert, partial ones at the edges (96, 48)
    tensors, expected = {}, {}
    for key, a in _tensors(moe_src).items():
        w = torch.from_numpy(a.copy())
        if "experts" in key:
            q, s = _quantise(w, block)
            tensors[key], tensors[key + "_scale_inv"] = q, s
            expected[key] = _bf16_numpy(_dequantise(q, s, block))
        else:
            tensors[key] = w.to(torch.bfloat16)
            expected[key] = _bf16_numpy(tensors[key])
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj_scale_inv"
    assert tensors[key].shape == (8, 3, 2)
    src = tmp_path / "fp8"
    src.mkdir()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((moe_src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (src / "config.json").write_text(json.dumps(config))

    assert _cli(src, tmp_path / "orbax") == 0
    assert _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf") == 0
    _assert_bit_identical(expected, _tensors(tmp_path / "back"))


def test_fp8_checkpoint_dequantises_in_convert_and_from_pretrained(tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen3VLForConditionalGeneration

    cfg = hf_config("qwen3_vl")
    # Widths that give several 128x128 blocks with partial edge blocks (192 = 128 + 64).
    cfg.text_config.hidden_size = 192
    cfg.text_config.intermediate_size = 320
    cfg.vision_config.out_hidden_size = 192
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    fp8, dequantised = {}, {}
    for key, w in state.items():
        quantised = ".layers." in key and "language_model" in key and key.endswith("proj.weight")
        if quantised:
            q, s = _quantise(w)
            fp8[key], fp8[key + "_scale_inv"] = q, s
            dequantised[key] = _dequantise(q, s)
        else:
            fp8[key] = w.to(torch.bfloat16)
            dequantised[key] = w.to(torch.bfloat16)
    assert fp8["model.language_model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)

    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "bf16"
    model.to(torch.bfloat16).load_state_dict(dequantised)
    model.save_pretrained(ref_dir, safe_serialization=True)
    fp8_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in fp8.items()},
        fp8_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((ref_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))

    # convert: FP8 -> Orbax (bf16) -> HF equals the dequantised bf16 checkpoint bit for bit.
    assert _cli(fp8_dir, tmp_path / "orbax") == 0
    assert orbax_io.read_marker(tmp_path / "orbax")["dtype"] == "bfloat16"
    assert _cli(tmp_path / "orbax", tmp_path / "back", "--to", "hf") == 0
    expected = {k: _bf16_numpy(v) for k, v in dequantised.items()}
    _assert_bit_identical(expected, _tensors(tmp_path / "back"))
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in exported and exported["dtype"] == "bfloat16"

    # from_pretrained: the FP8 folder, its Orbax conversion and the bf16 folder are one model.
    ref = from_pretrained(ref_dir, dtype="bfloat16")
    for other in (
        from_pretrained(fp8_dir, dtype="bfloat16"),
        from_pretrained(tmp_path / "orbax", dtype="bfloat16"),
    ):
        _assert_bit_identical(params_as_numpy(ref), params_as_numpy(other))
    inputs = build_inputs("qwen3_vl", [PROMPT])
    np.testing.assert_array_equal(
        np.asarray(from_pretrained(fp8_dir, dtype="bfloat16")(**inputs)), np.asarray(ref(**inputs))
    )


def test_save_model_of_a_trained_model_restores_and_exports(tmp_path, moe_src, monkeypatch):
    """The training side: `save_model(model, folder, config=HF config)` is a folder that
    `from_pretrained` restores and `convert --to hf` exports (experts in the hub layout)."""
    model = from_pretrained(moe_src, dtype="float32")
    config = json.loads((moe_src / "config.json").read_text())
    folder = tmp_path / "model"
    orbax_io.save_model(model, folder, config=config, chunk_bytes=2**16)
    assert orbax_io.is_orbax_folder(folder)
    _assert_bit_identical(
        params_as_numpy(model), params_as_numpy(from_pretrained(folder, dtype="float32"))
    )
    with pytest.raises(CheckpointError, match="already exists"):
        orbax_io.save_model(model, folder, config=config)
    # Relative folders, as `generate --model qwenvl_demo/model` gives them (Orbax itself takes
    # absolute paths only).
    monkeypatch.chdir(tmp_path)
    orbax_io.save_model(model, Path("relative"), config=config, chunk_bytes=2**16)
    _assert_bit_identical(
        params_as_numpy(model), params_as_numpy(from_pretrained("relative", dtype="float32"))
    )
    assert _cli(folder, tmp_path / "hf", "--to", "hf") == 0
    got = _tensors(tmp_path / "hf")
    for key, a in _tensors(moe_src).items():
        if "experts" in key:
            a = np.swapaxes(a, 1, 2)
        assert got[key].tobytes() == np.ascontiguousarray(a).tobytes(), key


# ----------------------------------------------------------------------------- sharding


def test_from_pretrained_orbax_restores_into_shards(tmp_path, moe_src):
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from qwenvl_jax.loading import convert
        from qwenvl_jax.modeling import build_model, from_pretrained, params_as_numpy
        from qwenvl_jax.config import load_config
        from qwenvl_jax.sharding import make_mesh
        assert jax.device_count() == 8
        src, dst = {str(moe_src)!r}, {str(tmp_path / "orbax")!r}
        # Written from arrays sharded 2x2x2: each shard is saved by its holder.
        convert.hf_to_orbax(src, dst, "float32", progress=False,
                            mesh=make_mesh(data=2, fsdp=2, tensor=1, expert=2))
        mesh = make_mesh(data=1, fsdp=2, tensor=2, expert=2)
        model = from_pretrained(dst, dtype="float32", mesh=mesh)
        abstract = build_model(load_config(src), dtype="float32", mesh=mesh, abstract=True)
        import flax.nnx as nnx
        want = {{p: v.get_raw_value().sharding for p, v in nnx.to_flat_state(nnx.state(abstract))}}
        split = 0
        for p, v in nnx.to_flat_state(nnx.state(model)):
            arr = v.get_raw_value()
            assert arr.sharding == want[p], (p, arr.sharding, want[p])
            split += not arr.sharding.is_fully_replicated
        assert split >= 10, split
        ref = params_as_numpy(from_pretrained(src, dtype="float32"))
        got = params_as_numpy(model)
        assert sorted(ref) == sorted(got)
        assert all(np.array_equal(ref[k], got[k]) for k in ref)
        print("OK", split)
    """)
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


# ----------------------------------------------------------------------------- bad input


def _assert_fails_cleanly(capsys, tmp_path: Path, args: list, *, words: list[str]) -> None:
    dst = tmp_path / "dst"
    capsys.readouterr()
    assert _cli(*args, dst) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


def test_truncated_safetensors(tmp_path, capsys, moe_src):
    src = shutil.copytree(moe_src, tmp_path / "src")
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(src / "model.safetensors") - 1000)
    _assert_fails_cleanly(capsys, tmp_path, [src], words=["model.safetensors", "truncated"])


def test_index_naming_a_missing_shard(tmp_path, capsys):
    src = _save_hf(hf_model("qwen2_vl"), tmp_path / "src", max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (src / shard).unlink()
    _assert_fails_cleanly(capsys, tmp_path, [src], words=[shard, "missing"])


def test_config_of_an_unknown_family(tmp_path, capsys, moe_src):
    src = shutil.copytree(moe_src, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    _assert_fails_cleanly(capsys, tmp_path, [src], words=["llama"])


def test_export_of_a_folder_that_is_not_orbax(tmp_path, capsys, moe_src):
    _assert_fails_cleanly(capsys, tmp_path, [moe_src, "--to", "hf"], words=["not an Orbax"])


def test_existing_destination_is_kept(tmp_path, capsys, moe_src):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert _cli(moe_src, tmp_path / "dst") == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]


def test_convert_removes_temporaries_of_interrupted_runs_only(tmp_path, capsys, moe_src):
    """A killed convert leaves `.DST.tmp-<pid>`; the next one removes it when that process is
    gone, and keeps the temporary folder of a process that still runs."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stale = tmp_path / f".dst.tmp-{int(gone.stdout)}"
        (stale / "params").mkdir(parents=True)
        (stale / "params" / "half.bin").write_bytes(b"\0" * 1000)
        live = tmp_path / f".dst.tmp-{running.pid}"
        live.mkdir()
        (live / "part.bin").write_bytes(b"busy")
        other = tmp_path / f".other.tmp-{int(gone.stdout)}"  # another destination's
        other.mkdir()
        assert _cli(moe_src, tmp_path / "dst") == 0
        assert orbax_io.is_orbax_folder(tmp_path / "dst")
        assert not stale.exists()
        assert (live / "part.bin").read_bytes() == b"busy"
        assert other.is_dir()
    finally:
        running.kill()
        running.wait()


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
def test_tensor_errors_name_the_tensor(tmp_path, moe_src, case):
    key = "model.language_model.layers.1.mlp.up_proj.weight"

    def edit(k, a):
        if k != key:
            return [(k, a)]
        if case == "missing":
            return []
        if case == "unexpected":
            return [(k, a), ("model.language_model.layers.1.mlp.extra.weight", a)]
        return [(k, a[:-1])]

    src = _rewrite(moe_src, tmp_path / "src", edit)
    name = "mlp.extra.weight" if case == "unexpected" else key
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        convert.hf_to_orbax(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst" / orbax_io.MARKER_NAME).exists()


def test_cli_subprocess_reports_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwenvl_jax.cli",
            "convert",
            str(tmp_path / "src"),
            str(tmp_path / "dst"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "config.json" in out.stderr or "vision_config" in out.stderr
    assert not (tmp_path / "dst").exists()
