"""`qwenvl-jax plan`: the train step compiled ahead of time for a topology, without weights or
data. The plan's memory is that of the step the trainer compiles for a run; the matmul FLOPs read
from the HLO count loop bodies by their trip counts (XLA's cost analysis counts them once), so the
estimated MFU stays a real bound; a step that does not fit exits 2 in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.cli import main
from qwenvl_jax.train import plan as plan_mod
from qwenvl_jax.train.plan import hlo_matmul_flops

REPO = Path(__file__).resolve().parents[1]
RUN = ["model=tiny_qwen2_vl", "stage=2", "batch_size=8", "seq_len=64", "data.max_patches=128"]


def _compiled_text(fn, *args) -> tuple[str, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return compiled.as_text(), float(cost["flops"])


def test_hlo_flops_of_plain_matmuls_equal_the_cost_analysis():
    a = jnp.ones((64, 96), jnp.float32)
    b = jnp.ones((96, 32), jnp.float32)
    c = jnp.ones((32, 48), jnp.float32)
    text, xla = _compiled_text(lambda a, b, c: (a @ b) @ c, a, b, c)
    flops = hlo_matmul_flops(text)
    expected = 2 * 64 * 96 * 32 + 2 * 64 * 32 * 48
    assert flops["once"] == flops["with_trips"] == expected == xla
    assert flops["unknown_loops"] == 0


def test_hlo_flops_count_loop_bodies_by_their_trip_counts():
    w = jnp.ones((5, 32, 32), jnp.float32)  # five stacked layers
    x = jnp.ones((16, 32), jnp.float32)

    def scanned(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    def unrolled(w, x):
        for i in range(5):
            x = jnp.tanh(x @ w[i])
        return x

    def fori(w, x):
        return jax.lax.fori_loop(0, 7, lambda i, h: jnp.tanh(h @ w[0]), x)

    layer = 2 * 16 * 32 * 32
    s_text, s_xla = _compiled_text(scanned, w, x)
    u_text, _ = _compiled_text(unrolled, w, x)
    f_text, _ = _compiled_text(fori, w, x)
    s, u, f = hlo_matmul_flops(s_text), hlo_matmul_flops(u_text), hlo_matmul_flops(f_text)
    assert s["once"] == layer and s["once"] <= s_xla < 2 * layer  # XLA: the body once
    assert s["with_trips"] == u["with_trips"] == u["once"] == 5 * layer
    assert f["with_trips"] == 7 * layer and f["once"] == layer
    assert s["unknown_loops"] == f["unknown_loops"] == 0


SCRIPT = r"""
import json, sys
import jax
from qwenvl_jax.config import load_config
from qwenvl_jax.modeling import build_model
from qwenvl_jax.train import blocks
from qwenvl_jax.train.config import load_train_config
from qwenvl_jax.train.loop import batch_shards, make_data, run_mesh
from qwenvl_jax.train.plan import plan
from qwenvl_jax.train.step import Trainer

assert len(jax.devices()) == 8
cfg = load_train_config(None, json.loads(sys.argv[1]))
report = plan(cfg, "cpu:8")

# the step exactly as `train` builds and compiles it, with real weights and a real batch
config = load_config(cfg.model)
mesh = run_mesh(cfg.mesh, batch_size=cfg.batch_size, num_experts=config.text.num_experts)
model = build_model(config, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)
blocks.configure(model, cfg.remat, cfg.scan_layers)
trainer = Trainer(model, cfg, mesh)
groups = batch_shards(mesh, cfg.batch_size)
batch = trainer.put_batch(next(make_data(cfg, config, cfg.model, vision_groups=groups)))
state = trainer.init_state()
mem = trainer.compile(state, batch).memory_analysis()
print(json.dumps({"plan": report, "trainer": {
    "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
    "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
    "code": mem.generated_code_size_in_bytes}}))
"""


def test_plan_on_8_devices_is_the_memory_of_the_trainers_step():
    run = [*RUN, "data.train=synthetic", "remat=full", "scan_layers=true"]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(run)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    plan, real = got["plan"], got["trainer"]
    chip = plan["per_chip_bytes"]
    assert chip["temporaries"] == real["temp"] and chip["code"] == real["code"]
    total = real["argument"] + real["output"] - real["alias"] + real["temp"] + real["code"]
    assert chip["total"] == total
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert plan["vision_patches"] == 128 and plan["fits"]
    # the scanned decoder and the attention loops are counted by their trip counts
    assert plan["loop_scale"] > 1 and plan["unknown_loops"] == 0
    assert 0 < plan["est_mfu"] <= 1, plan


def test_cli_json_and_a_step_that_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(plan_mod, "_host_memory_bytes", lambda: 1e6)  # a 1 MB "chip"
    code = main(["plan", "--topology", "cpu:1", "--json", *RUN, "remat=full"])
    out, err = capsys.readouterr()
    assert code == 2
    report = json.loads(out)
    for key in ("fits", "per_chip_bytes", "hbm_bytes", "compile_s", "est_step_s", "est_mfu"):
        assert key in report
    assert report["fits"] is False and report["per_chip_bytes"]["total"] > 1e6
    assert 0 < report["est_mfu"] <= 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "GiB per chip" in lines[0] and "cpu:1" in lines[0]


@pytest.mark.parametrize(
    "topology, message",
    [("v5p", "KIND:SHAPE"), ("tpu9:2x2", "unknown chip"), ("cpu:zero", "device count")],
)
def test_bad_topologies_are_one_line_errors(capsys, topology, message):
    assert main(["plan", "--topology", topology, *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install "qwenvl_jax[tpu]"): TPU topologies need it',
)
def test_plan_for_a_tpu_slice():
    from qwenvl_jax.train.config import load_train_config

    cfg = load_train_config(None, [*RUN, "remat=full", "scan_layers=true"])
    report = plan_mod.plan(cfg, "v5p:2x2x2")
    assert report["chips"] == 8 and report["chip"] == "v5p" and report["fits"]
    assert 0 < report["est_mfu"] <= 1 and report["est_step_s"] > 0
    assert report["hbm_bytes"] == int(95.74 * 2**30)
    assert np.isfinite(report["est_step_s"]) and report["loop_scale"] > 1
    # the loop bodies are timed by a second compile with the layer scans unrolled twice: their
    # repeated trips add their own time, more than the time of one trip of each
    bodies = report["loop_bodies"]
    assert report["est_source"] == "compiler, loop bodies timed", report
    assert 0 < bodies["body_s"] <= report["compiler_s"] and bodies["body_flops"] > 0
    repeats = report["hlo_matmul_flops_per_chip"] - report["hlo_matmul_flops_once_per_chip"]
    kernels = report["kernel_flops_per_chip"] / plan_mod.topology("v5p:2x2x2").peak_flops
    expected = report["compiler_s"] + bodies["s_per_flop"] * repeats + kernels
    assert repeats > 0 and report["est_step_s"] == pytest.approx(expected, rel=1e-12)


def test_a_missing_libtpu_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    assert main(["plan", "--topology", "v5p:2x2x2", *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "qwenvl_jax[tpu]"' in err


def test_the_tpu_compilers_out_of_memory_refusal_is_read_as_the_answer():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (3.20T) exceeds available HBM (95.74G)."
    )
    assert plan_mod._out_of_memory(message) == int(3.20 * 2**40)
    assert plan_mod._out_of_memory("INTERNAL: something else") is None


def test_hlo_reader_takes_instructions_over_several_lines_and_kernel_costs():
    """TPU HLO writes kernel metadata over several lines (one of them starting with '}}'): the
    reader keeps reading the computation (a kernel that declares its cost is the compiler's to
    price and counts no FLOPs here; splash attention, which declares none, is counted)."""
    text = "\n".join(
        [
            "ENTRY %main (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {",
            "  %p0 = f32[8,16]{1,0} parameter(0)",
            "  %p1 = f32[16,4]{1,0} parameter(1)",
            '  %k = f32[8,16]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call", '
            "frontend_attributes={kernel_metadata={",
            '"xprof_metadata":"{}"',
            '}}, backend_config={"cost_estimate":{"flops":"1000","transcendentals":"0"}}',
            "  %q = bf16[2,128,16]{2,1,0} parameter(2)",
            "  %kv = bf16[1,128,16]{2,1,0} parameter(3)",
            "  %splash_mha_fwd_segmented.3 = bf16[2,128,16]{2,1,0} custom-call(%p0, %p0, %q, %kv, "
            '%kv), custom_call_target="tpu_custom_call"',
            "  ROOT %d = f32[8,4]{1,0} dot(%k, %p1), lhs_contracting_dims={1}, "
            "rhs_contracting_dims={0}",
            "}",
        ]
    )
    flops = hlo_matmul_flops(text)
    assert flops["once"] == flops["with_trips"] == 2 * 8 * 16 * 4
    # splash attention's two matmuls per head over every block
    assert flops["kernels"] == 2 * 2 * 2 * 128 * 128 * 16
    # a local mask's block map keeps 1 of 4 key blocks a row: a quarter of the blocks (the dk/dv
    # kernel's keeps 1 of 4 query blocks a column)
    for blocks in ("4,1", "1,4"):
        local = text.replace("%p0, %p0, %q", "%m, %m, %q").replace(
            "  %q = ", f"  %m = s8[1,{blocks}]{{2,1,0}} parameter(4)\n  %q = "
        )
        assert hlo_matmul_flops(local)["kernels"] == 2 * 2 * 2 * 128 * 128 * 16 / 4
    # the kernel mapped over 3 rows of a batch (q [3, H, T, D]): 3 times the FLOPs
    rows = text.replace("bf16[2,128,16]", "bf16[3,2,128,16]").replace(
        "bf16[1,128,16]", "bf16[3,1,128,16]"
    )
    assert hlo_matmul_flops(rows)["kernels"] == 3 * 2 * 2 * 2 * 128 * 128 * 16


# A counted loop as the TPU compiler writes its windowed einsums (unrolled twice: the counter
# steps by 2 up to 4, from a start the caller sets), with a 16x32x32 dot in the body.
STRIDED_LOOP = """
%cond (p: (s32[], f32[16,32], f32[32,32])) -> pred[] {
  %p = (s32[], f32[16,32], f32[32,32]) parameter(0)
  %bound = s32[] constant(4)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%body (q: (s32[], f32[16,32], f32[32,32])) -> (s32[], f32[16,32], f32[32,32]) {
  %q = (s32[], f32[16,32], f32[32,32]) parameter(0)
  %i.1 = s32[] get-tuple-element(%q), index=0
  %x = f32[16,32]{1,0} get-tuple-element(%q), index=1
  %w = f32[32,32]{1,0} get-tuple-element(%q), index=2
  %step = s32[] constant(STEP)
  %i.2 = s32[] copy(%i.1)
  %next = s32[] add(COUNTER, %step)
  %y = f32[16,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[16,32], f32[32,32]) tuple(%next, /*index=1*/%y, %w)
}

ENTRY %main (x0: f32[16,32], w0: f32[32,32]) -> f32[16,32] {
  %x0 = f32[16,32]{1,0} parameter(0)
  %w0 = f32[32,32]{1,0} parameter(1)
  %start = s32[] constant(START)
  %init = (s32[], f32[16,32], f32[32,32]) tuple(%start, %x0, %w0)
  %loop = (s32[], f32[16,32], f32[32,32]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[16,32]{1,0} get-tuple-element(%loop), index=1
}
"""


@pytest.mark.parametrize("start, step, trips", [(0, 1, 4), (0, 2, 2), (1, 2, 2), (1, 1, 3)])
@pytest.mark.parametrize("counter", ["%i.1", "%i.2"])  # the counter itself, or its copy
def test_hlo_flops_count_strided_loops_by_their_real_trip_counts(start, step, trips, counter):
    text = STRIDED_LOOP.replace("START", str(start)).replace("STEP", str(step))
    text = text.replace("COUNTER", counter)
    flops = hlo_matmul_flops(text)
    assert flops["once"] == 2 * 16 * 32 * 32
    assert flops["with_trips"] == trips * flops["once"]
    assert flops["unknown_loops"] == 0


KERNELS = """
ENTRY %main (x: bf16[256,128], w: bf16[4,128,128]) -> bf16[256,128] {
  %x = bf16[256,128]{1,0} parameter(0)
  %w = bf16[4,128,128]{2,1,0} parameter(1)
  %gmm.3 = bf16[256,128]{1,0} custom-call(%x, %w), custom_call_target="tpu_custom_call",
    backend_config={"custom_call_config": {"cost_estimate":{"flops":"8000"}}}
  ROOT %other.1 = bf16[256,128]{1,0} custom-call(%gmm.3, %w), custom_call_target="tpu_custom_call",
    backend_config={"custom_call_config": {"cost_estimate":{"flops":"1000"}}}
}
"""


def test_kernels_that_declare_their_cost_are_left_to_the_compiler():
    # the TPU compiler prices them itself (next test): counting their FLOPs again would count
    # their time twice
    assert hlo_matmul_flops(KERNELS)["kernels"] == 0


def test_the_tpu_compiler_prices_a_kernel_by_its_declared_cost():
    """A Pallas call that declares 1e12 FLOPs and few bytes takes at least that many FLOPs at the
    chip's peak in the compiler's time; one that declares 1e10 bytes, at least their time at
    the chip's bandwidth (2.76 TB/s for v5p) or more."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "qwenvl_jax[tpu]"): no TPU compiler')
    from jax.experimental import pallas as pl
    from jax.sharding import SingleDeviceSharding

    topo = plan_mod.topology("v5p:2x2x2")
    x = jax.ShapeDtypeStruct(
        (512, 512), jnp.float32, sharding=SingleDeviceSharding(topo.devices[0])
    )

    def seconds(flops, nbytes):
        def double(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2

        cost = pl.CostEstimate(flops=flops, bytes_accessed=nbytes, transcendentals=0)
        call = pl.pallas_call(double, jax.ShapeDtypeStruct(x.shape, x.dtype), cost_estimate=cost)
        compiled = jax.jit(call).lower(x).compile()
        text = compiled.as_text()
        assert hlo_matmul_flops(text)["kernels"] == 0
        return plan_mod.compiler_seconds(compiled.cost_analysis(), text)

    assert seconds(10**12, 10**6) >= 10**12 / topo.peak_flops
    assert seconds(10**6, 10**10) >= 10**10 / 2.76e12
    assert seconds(10**6, 10**6) < 1e-5


# A batched matmul as the TPU compiler writes it: a convolution whose window runs over the 4
# heads of the kernel against a size-1 (padded) input dimension, so each output meets one tap.
HEADS_CONV = """
ENTRY %main (x: bf16[2,8,2,16,1], w: bf16[4,8,2,16,1]) -> bf16[2,8,4,8,1] {
  %x = bf16[2,8,2,16,1]{4,3,2,1,0} parameter(0)
  %w = bf16[4,8,2,16,1]{4,3,2,1,0} parameter(1)
  ROOT %c = bf16[2,8,4,8,1]{4,3,2,1,0} convolution(%x, %w), window={size=1x4x2 pad=0_0x3_3x0_0},
    dim_labels=0b2f1_1o2i0->0b1f2
}
"""


def test_convolutions_count_only_the_taps_that_meet_the_input():
    # per output: 16 input features x 2 positions of the '2' window x 1 of the 4 head taps
    assert hlo_matmul_flops(HEADS_CONV)["once"] == 2 * (2 * 8 * 4 * 8) * 16 * 2


# A matmul batched over two dimensions (heads x chunks) as the TPU compiler writes it: a
# convolution over a dilated input whose window equals the dilation, one real tap per output.
DILATED_CONV = """
ENTRY %main (x: f32[4,4,2,8], w: f32[4,4,8,8]) -> f32[4,4,2,8] {
  %x = f32[4,4,2,8]{3,2,1,0} parameter(0)
  %w = f32[4,4,8,8]{3,2,1,0} parameter(1)
  ROOT %c = f32[4,4,2,8]{3,2,1,0} convolution(%x, %w), window={size=4x4 stride=3x3 lhs_dilate=4x4},
    dim_labels=01bf_01oi->01bf
}
"""


def test_dilated_convolutions_count_one_tap_per_window():
    assert hlo_matmul_flops(DILATED_CONV)["once"] == 2 * (4 * 4 * 2 * 8) * 8


def test_compiler_seconds_leave_out_the_calls_it_cannot_time():
    # the TPU compiler adds -1 to optimal_seconds for each PrepareAsyncCallStart/Done it cannot
    # time (measured: a MoE layer with 5 pairs reads -9.99927); a host compiler gives no time
    hlo = "\n".join(
        f'  %p{i} = s32[] custom-call(), custom_call_target="PrepareAsyncCall{kind}"'
        for i, kind in enumerate(["Start", "Done"] * 5)
    )
    assert plan_mod.compiler_seconds({"optimal_seconds": -9.99927}, hlo) == pytest.approx(7.3e-4)
    assert plan_mod.compiler_seconds({"optimal_seconds": 3.35}, "") == 3.35
    assert plan_mod.compiler_seconds({"optimal_seconds": -2.0}, "") is None
    assert plan_mod.compiler_seconds({"flops": 1.0}, hlo) is None


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install "qwenvl_jax[tpu]"): TPU topologies need it',
)
def test_the_tpu_step_reduces_no_weight_gradient_whole(tmp_path):
    """Compiled for 8 v5p chips (mesh auto: fsdp 8), a 2-layer model at Qwen2.5-VL-3B's widths
    reduces no weight's gradient whole: every all-reduce left (norms, biases) is smaller than one
    chip's share of the smallest weight matrix, and the weights' gradients are reduce-scattered
    (the TPU compiler does it inside its windowed-einsum loops, as collective-permutes). The
    tiny presets cannot show this: at their sizes the compiler all-reduces a whole embedding or
    output-projection gradient (0.12 MiB, the whole weight), which this check would catch. About
    80 s of compile on a 2-core CPU."""
    from qwenvl_jax.config import PRESET_DIR, load_config
    from qwenvl_jax.models.build import build_model
    from qwenvl_jax.train.config import load_train_config

    d = json.loads((PRESET_DIR / "qwen2_5_vl_3b_instruct.json").read_text())
    d["text"].update(num_hidden_layers=2, vocab_size=32768)
    d["vision"].update(depth=4, fullatt_block_indexes=[3])
    (tmp_path / "config.json").write_text(json.dumps(d))
    run = [f"model={tmp_path}", "stage=2", "batch_size=16", "seq_len=1024", "remat=full"]
    with jax.default_matmul_precision("default"):  # Mosaic refuses float32 bfloat16 products
        report = plan_mod.plan(load_train_config(None, run), "v5p:2x2x2", time_loops=False)
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    model = build_model(load_config(tmp_path), dtype="bfloat16", abstract=True)
    # one layer's weight matrix (stacked layers hold [layers, in, out]; their norms and biases,
    # [layers, n], are no weight matrices)
    matrices = [
        v.get_value().shape[-2:]
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if path[-1] in ("kernel", "embedding")
    ]
    smallest_share = min(a * b * 2 for a, b in matrices) // report["chips"]  # bfloat16 bytes
    collectives = report["collectives"]
    assert collectives["counts"]["collective-permute"] > 0
    assert 0 < collectives["largest_all_reduce_bytes"] < smallest_share, (
        collectives,
        smallest_share,
    )
