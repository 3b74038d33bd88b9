"""Checkpoint I/O: safetensors and torch `.bin` readers, FP8 dequantisation, the safetensors
writer and atomic_dir, checked bit for bit against what torch / safetensors / transformers write
and read."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl_jax.errors import CheckpointError, InputError, QwenVLError
from qwenvl_jax.loading import (
    Fp8DequantReader,
    atomic_dir,
    open_checkpoint,
    write_safetensors,
)
from tests.checkpoints import REFERENCE_CONFIGS, v1_checkpoint

REPO = Path(__file__).resolve().parent.parent
FP8_CONFIG = REFERENCE_CONFIGS / "Qwen__Qwen3-VL-30B-A3B-Thinking-FP8" / "config.json"


def bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor, flat, for bit-for-bit comparison."""
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def assert_same(array: np.ndarray, tensor: torch.Tensor) -> None:
    assert array.shape == tuple(tensor.shape)
    assert array.dtype.name == str(tensor.dtype).removeprefix("torch.")
    assert array.flags.c_contiguous and array.flags.writeable
    np.testing.assert_array_equal(bits(array), bits(tensor))


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 4, 6, generator=g).to(torch.bfloat16),
        "f16": torch.randn(33, generator=g).to(torch.float16),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": (torch.randn(16, 8, generator=g) * 4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def one_line(e: pytest.ExceptionInfo, *names: str) -> str:
    message = str(e.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


# ---------------------------------------------------------------- safetensors


def test_safetensors_single(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for target in (tmp_path, tmp_path / "model.safetensors"):
        with open_checkpoint(target) as reader:
            assert reader.layout == "safetensors"
            assert reader.metadata == {"format": "pt"}
            assert reader.keys() == sorted(tensors)
            assert reader.total_bytes == sum(t.nbytes for t in tensors.values())
            for key, tensor in tensors.items():
                assert reader.shape(key) == tuple(tensor.shape)
                assert reader.dtype(key) == str(tensor.dtype).removeprefix("torch.")
                assert_same(reader.get(key), tensor)
            assert "missing" not in reader
            with pytest.raises(KeyError, match="missing"):
                reader.get("missing")


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def test_safetensors_sharded_save_pretrained(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, max_shard_size=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    state = tiny_model.state_dict()
    with open_checkpoint(tmp_path) as reader:
        assert reader.layout == "safetensors-sharded"
        assert reader.keys() == sorted(index["weight_map"]) == sorted(state)
        assert reader.total_bytes == index["metadata"]["total_size"]
        for key in reader:
            assert reader.file_of(key).name == index["weight_map"][key]
            assert_same(reader.get(key), state[key])


# ---------------------------------------------------------------- torch .bin


def bin_tensors() -> dict[str, torch.Tensor]:
    """Contiguous tensors of every dtype, plus views: transposes, slices, shared storages."""
    tensors = sample_tensors()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=g)
    base16 = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    tensors.update(
        {
            "view.base": base,
            "view.rows": base[2:5],  # shares base's storage, with an offset
            "view.cols": base[:, 1::3],  # strided
            "view.transpose": base.t(),
            "view.bf16_t": base16.t()[1:7],
            "view.expand": torch.randn(1, 4, generator=g).expand(3, 4),  # stride 0
            "param": torch.nn.Parameter(torch.randn(4, 3, generator=g)),
        }
    )
    return tensors


def test_torch_bin_single(tmp_path):
    tensors = bin_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    with open_checkpoint(tmp_path) as reader:
        assert reader.layout == "torch"
        assert reader.keys() == sorted(tensors)
        for key in tensors:
            assert_same(reader.get(key), loaded[key])
            assert_same(reader.get(key), tensors[key])


def test_torch_bin_sharded(tmp_path):
    tensors = bin_tensors()
    keys = sorted(tensors)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: tensors[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as reader:
        assert reader.layout == "torch-sharded"
        assert reader.keys() == keys
        for key in keys:
            assert reader.file_of(key).name == weight_map[key]
            assert_same(reader.get(key), tensors[key])


@pytest.fixture(scope="session")
def qwen_vl_v1(tmp_path_factory):
    return v1_checkpoint(tmp_path_factory)


def test_qwen_vl_v1_fixture(qwen_vl_v1):
    index = json.loads((qwen_vl_v1 / "pytorch_model.bin.index.json").read_text())
    with open_checkpoint(qwen_vl_v1) as reader:
        assert reader.layout == "torch-sharded"
        assert reader.keys() == sorted(index["weight_map"])
        assert reader.total_bytes == index["metadata"]["total_size"]
        seen = set()
        for shard in sorted(set(index["weight_map"].values())):
            state = torch.load(qwen_vl_v1 / shard, weights_only=True)
            for key, tensor in state.items():
                assert tensor.dtype == torch.bfloat16
                assert_same(reader.get(key), tensor)
                seen.add(key)
        assert seen == set(index["weight_map"])


def _write_zip_pickle(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    _write_zip_pickle(evil, pickle.dumps({"w": _SystemCall(f"touch {marker}")}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(evil)
    one_line(e, str(evil), "system", "refusing")
    assert not marker.exists()

    code = f"open({str(marker)!r}, 'w').close()"
    _write_zip_pickle(evil, pickle.dumps({"w": _Eval(code)}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(evil)
    one_line(e, ".eval'", "refusing")
    assert not marker.exists()

    # An allowed function called with something that is not a storage.
    # {"w": _rebuild_tensor_v2("abc", 0, (), ())} written opcode by opcode.
    rebuild = (
        b"\x80\x02}X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n(X\x03\x00\x00\x00abcK\x00))tRs."
    )
    _write_zip_pickle(evil, rebuild)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(evil)
    one_line(e, "not a storage")


def test_pickle_cannot_alter_allowed_functions(tmp_path):
    # BUILD on an allowed function, as a pickle could to rewrite its defaults.
    evil = tmp_path / "evil.bin"
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    _write_zip_pickle(evil, payload)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(evil)
    one_line(e, str(evil), "refusing")


def test_torch_bin_compressed_members(tmp_path):
    """A torch.save file re-zipped with deflate is read through zipfile instead of pread."""
    tensors = bin_tensors()
    torch.save(tensors, tmp_path / "plain.bin")
    with (
        zipfile.ZipFile(tmp_path / "plain.bin") as src,
        zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with open_checkpoint(tmp_path / "pytorch_model.bin") as reader:
        for key in tensors:
            assert_same(reader.get(key), tensors[key])


def test_legacy_torch_format_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    one_line(e, str(path), "legacy")


# ---------------------------------------------------------------- broken checkpoints


def _sharded_safetensors(folder: Path) -> dict:
    tensors = {f"w{i}": torch.full((64, 64), float(i)) for i in range(4)}
    write_safetensors(
        folder, ((k, v.numpy()) for k, v in tensors.items()), max_shard_bytes=2 * 64 * 64 * 4
    )
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def break_truncated_safetensors(folder: Path) -> tuple[Path, str]:
    save_file({"w": torch.randn(64, 64)}, str(folder / "model.safetensors"))
    _truncate(folder / "model.safetensors", 0.5)
    return folder / "model.safetensors", "truncated"


def break_header_length(folder: Path) -> tuple[Path, str]:
    path = folder / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(path))
    data = bytearray(path.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path, "header length"


def break_header_json(folder: Path) -> tuple[Path, str]:
    path = folder / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(path))
    data = bytearray(path.read_bytes())
    data[8:12] = b"{oops"[:4]
    path.write_bytes(bytes(data))
    return path, "corrupt safetensors header"


def break_missing_shard(folder: Path) -> tuple[Path, str]:
    index = _sharded_safetensors(folder)
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    return folder / "model.safetensors.index.json", shard


def break_key_missing_from_shard(folder: Path) -> tuple[Path, str]:
    index = _sharded_safetensors(folder)
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["not.stored"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / shard, "'not.stored'"


def break_truncated_zip(folder: Path) -> tuple[Path, str]:
    path = folder / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    _truncate(path, 0.6)
    return path, "truncated"


@pytest.mark.parametrize(
    "breaker",
    [
        break_truncated_safetensors,
        break_header_length,
        break_header_json,
        break_missing_shard,
        break_key_missing_from_shard,
        break_truncated_zip,
    ],
)
def test_broken_checkpoints_fail_at_open(tmp_path, breaker):
    named, words = breaker(tmp_path)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert isinstance(e.value, QwenVLError)
    one_line(e, str(named), words)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    one_line(e, str(tmp_path), "no weights")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "absent")


# ---------------------------------------------------------------- FP8


def _expand(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :rows, :cols]


def test_fp8_dequantisation(tmp_path):
    if not FP8_CONFIG.is_file():
        pytest.skip(f"{FP8_CONFIG} is missing (the shared reference configs)")
    quant_config = json.loads(FP8_CONFIG.read_text())["quantization_config"]
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 200, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) * 1e-2 + 1e-4  # float32, partial edge blocks
    experts = (torch.randn(4, 300, 260, generator=g) * 50).to(torch.float8_e4m3fn)
    experts_scale = (torch.rand(4, 3, 3, generator=g) + 0.5).to(torch.bfloat16)
    plain = torch.randn(10, 20, generator=g).to(torch.bfloat16)
    per_tensor = (torch.randn(64, 48, generator=g) * 10).to(torch.float8_e4m3fn)
    per_tensor_scale = torch.tensor(0.0123)
    prefix = "model.language_model.layers.0.mlp"
    save_file(
        {
            "proj.weight": per_tensor,
            "proj.weight_scale_inv": per_tensor_scale,
            f"{prefix}.down_proj.weight": weight,
            f"{prefix}.down_proj.weight_scale_inv": scale,
            f"{prefix}.experts.gate_up_proj": experts,
            f"{prefix}.experts.gate_up_proj_scale_inv": experts_scale,
            "lm_head.weight": plain,
        },
        str(tmp_path / "model.safetensors"),
    )
    want_weight = weight.float() * _expand(scale, 300, 200)
    want_experts = experts.float() * _expand(experts_scale.float(), 300, 260)

    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.testing.assert_close(
        _dequantize_fp8_weight(weight, scale, [128, 128], torch.float32),
        want_weight,
        rtol=0,
        atol=0,
    )

    with Fp8DequantReader(open_checkpoint(tmp_path), quant_config, "float32") as reader:
        assert reader.keys() == sorted(
            [
                f"{prefix}.down_proj.weight",
                f"{prefix}.experts.gate_up_proj",
                "lm_head.weight",
                "proj.weight",
            ]
        )
        assert reader.quantized_keys == sorted(
            [f"{prefix}.down_proj.weight", f"{prefix}.experts.gate_up_proj", "proj.weight"]
        )
        assert f"{prefix}.down_proj.weight_scale_inv" not in reader
        assert reader.dtype(f"{prefix}.down_proj.weight") == "float32"
        assert reader.shape(f"{prefix}.experts.gate_up_proj") == (4, 300, 260)
        assert reader.dtype("lm_head.weight") == "bfloat16"
        assert_same(reader.get(f"{prefix}.down_proj.weight"), want_weight)
        assert_same(reader.get(f"{prefix}.experts.gate_up_proj"), want_experts)
        assert_same(reader.get("lm_head.weight"), plain)
        assert_same(reader.get("proj.weight"), per_tensor.float() * per_tensor_scale)
    with Fp8DequantReader(open_checkpoint(tmp_path), quant_config, "bfloat16") as reader:
        assert_same(reader.get(f"{prefix}.down_proj.weight"), want_weight.to(torch.bfloat16))
        assert_same(reader.get(f"{prefix}.experts.gate_up_proj"), want_experts.to(torch.bfloat16))


def test_fp8_mismatches_are_errors(tmp_path):
    quant_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    weight = torch.randn(300, 200).to(torch.float8_e4m3fn)
    save_file(
        {"a.weight": weight, "a.weight_scale_inv": torch.ones(2, 2)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError) as e:
        Fp8DequantReader(open_checkpoint(tmp_path), quant_config)
    one_line(e, "'a.weight'", "scale grid")
    save_file({"a.weight": weight}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        Fp8DequantReader(open_checkpoint(tmp_path), quant_config)
    one_line(e, "'a.weight'", "_scale_inv")


# ---------------------------------------------------------------- writer


def test_writer_round_trip_and_sharding(tmp_path, qwen_vl_v1):
    from huggingface_hub import split_torch_state_dict_into_shards

    max_shard = 12 * 2**20
    with open_checkpoint(qwen_vl_v1) as reader:
        keys = reader.keys()
        plan = [(k, reader.shape(k), reader.dtype(k)) for k in keys]
        result = write_safetensors(tmp_path / "streamed", reader.items(), max_shard)
        planned = write_safetensors(tmp_path / "planned", reader.items(), max_shard, plan=plan)
        assert planned == result
        index = json.loads((tmp_path / "streamed/model.safetensors.index.json").read_text())
        assert index["weight_map"] == result.weight_map
        assert index["metadata"]["total_size"] == reader.total_bytes == result.total_size
        assert sorted(os.listdir(tmp_path / "streamed")) == sorted(
            [*result.files, "model.safetensors.index.json"]
        )

        # Same grouping and file names as huggingface_hub (what save_pretrained uses).
        state = {k: torch.from_numpy(reader.get(k).view(np.uint16)) for k in keys}
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard)
        assert split.tensor_to_filename == result.weight_map

        for name in result.files:
            streamed = (tmp_path / "streamed" / name).read_bytes()
            assert (
                hashlib.sha256(streamed).digest()
                == hashlib.sha256((tmp_path / "planned" / name).read_bytes()).digest()
            )
            loaded = load_file(str(tmp_path / "streamed" / name))
            header_len = 8 + int.from_bytes(streamed[:8], "little")
            assert len(loaded) == 1 or len(streamed) - header_len <= max_shard
            for key, tensor in loaded.items():
                assert_same(reader.get(key), tensor)
        with open_checkpoint(tmp_path / "streamed") as again:
            assert again.keys() == keys
            for key in keys:
                assert_same(
                    again.get(key),
                    torch.from_numpy(reader.get(key).view(np.uint16)).view(torch.bfloat16),
                )


def test_writer_output_loads_in_transformers(tmp_path, tiny_model):
    from transformers import Qwen2ForCausalLM

    state = tiny_model.state_dict()
    arrays = ((k, v.view(torch.int16).numpy().view("bfloat16")) for k, v in state.items())
    result = write_safetensors(tmp_path, arrays, max_shard_bytes=50_000)
    assert len(result.files) > 1
    tiny_model.config.save_pretrained(tmp_path)
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded_state = loaded.state_dict()
    assert sorted(loaded_state) == sorted(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(bits(loaded_state[key]), bits(tensor))

    # Rewriting as one file removes the shards and the index of the earlier save.
    write_safetensors(tmp_path, ((k, v.float().numpy()) for k, v in state.items()))
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert load_file(str(tmp_path / "model.safetensors"))["lm_head.weight"].dtype == torch.float32


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        write_safetensors(tmp_path, [("a", np.zeros(2)), ("a", np.zeros(2))])
    with pytest.raises(ValueError, match="plan"):
        write_safetensors(tmp_path, [("a", np.zeros(2))], plan=[("a", (3,), "float64")])
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_atomic_dir(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        assert tmp == tmp_path / f".out.tmp-{os.getpid()}"
        (tmp / "a.txt").write_text("a")
        assert not dst.exists()
    assert (dst / "a.txt").read_text() == "a" and not tmp.exists()

    with pytest.raises(InputError) as e, atomic_dir(dst):
        pass
    one_line(e, str(dst), "not empty")

    with pytest.raises(RuntimeError), atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert not tmp.exists() and sorted(os.listdir(dst)) == ["a.txt"]

    with atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(dst)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from qwenvl_jax.loading import open_checkpoint, write_safetensors

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    folder, rows, cols, count = sys.argv[1], 7680, 1024, 10  # 10 x 30 MiB of float32

    def tensors():
        for i in range(count):
            a = np.full((rows, cols), float(i), np.float32)
            a[:, 0] = np.arange(rows)
            yield f"layer.{i}.weight", a

    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    write_safetensors(folder + "/streamed", tensors(), max_shard_bytes=100 * 2**20)
    plan = [(f"layer.{i}.weight", (rows, cols), "float32") for i in range(count)]
    write_safetensors(folder + "/planned", tensors(), max_shard_bytes=100 * 2**20, plan=plan)
    total = 0
    for sub in ("streamed", "planned"):
        with open_checkpoint(folder + "/" + sub) as reader:
            total = reader.total_bytes
            for i, key in enumerate(sorted(reader.keys(), key=lambda k: int(k.split(".")[1]))):
                a = reader.get(key)
                assert a[5, 3] == i and a[rows - 1, 0] == rows - 1, key
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "total": total,
                      "largest": rows * cols * 4}))
""")


def test_peak_memory_stays_near_one_tensor(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["total"] >= 300 * 2**20
    assert len(list((tmp_path / "streamed").glob("model-*-of-00004.safetensors"))) == 4
    growth = stats["peak"] - stats["baseline"]
    assert growth < stats["largest"] + 150 * 2**20, stats
