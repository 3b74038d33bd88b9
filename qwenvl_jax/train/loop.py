"""The training loop behind `qwenvl-jax train`.

    train(cfg, workdir)

builds the mesh and the data iterator (both checked before anything is written), the model (the
source weights, or only shapes when a checkpoint will be restored) and the train step; resumes
from the newest checkpoint under `WORKDIR/checkpoints/` that reads back, when there is one; then
runs `cfg.steps` optimiser steps with a progress bar (loss, tokens/s, MFU), writing
`metrics.jsonl`, TensorBoard events and `loss.png`, saving a checkpoint every `checkpoint_every`
steps and on SIGTERM, and finally exports the trained model to `WORKDIR/model/` (an Orbax folder
that `from_pretrained`, `generate` and `convert` read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from qwenvl_jax.config import ModelConfig, load_config
from qwenvl_jax.data.batch import padding_share
from qwenvl_jax.errors import CheckpointError, ConfigError
from qwenvl_jax.sharding import make_mesh
from qwenvl_jax.train import blocks
from qwenvl_jax.train.checkpoint import Checkpoints, StopSignal
from qwenvl_jax.train.config import MeshConfig, TrainConfig, resolve_mesh, resolve_model_path
from qwenvl_jax.train.flops import step_flops
from qwenvl_jax.train.freeze import summary
from qwenvl_jax.train.metrics import MetricsLog, peak_flops
from qwenvl_jax.train.step import Trainer

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped early, checkpoint saved; start again to resume


def run_mesh(
    mc: MeshConfig, devices: list | None = None, *, batch_size: int = 0, num_experts: int = 0
) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor, expert) mesh of a run; a -1 axis takes the remaining devices;
    `mesh: auto` is resolved here (`resolve_mesh`) for the run's batch size and experts."""
    devices = jax.devices() if devices is None else devices
    if mc.auto:
        if batch_size < 1:
            raise ValueError("an auto mesh needs the run's batch_size")
        mc = resolve_mesh(mc, len(devices), batch_size, num_experts)
    sizes = [mc.data, mc.fsdp, mc.tensor, mc.expert]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"mesh {mc} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh {dict(zip(('data', 'fsdp', 'tensor', 'expert'), sizes))} "
            f"needs {int(np.prod(sizes))} devices, {len(devices)} available"
        )
    return make_mesh(*sizes, devices=devices)


def load_model(
    cfg: TrainConfig, model_path: str, config: ModelConfig, mesh, *, abstract: bool
) -> nnx.Module:
    """The source weights (a checkpoint folder), a random init (a preset name), or shapes only
    (abstract, when a training checkpoint provides the weights)."""
    from qwenvl_jax.modeling import build_model, from_pretrained

    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh)
    if abstract:
        return build_model(config, abstract=True, **kw)
    if Path(model_path).is_dir():
        return from_pretrained(model_path, progress=cfg.progress, **kw)
    log.info("%s is a preset: random initial weights (seed %d)", model_path, cfg.seed)
    return build_model(config, seed=cfg.seed, **kw)


def batch_shards(mesh: jax.sharding.Mesh, batch_size: int) -> int:
    """The data-parallel shards of the mesh (data x fsdp x expert): what the batch rows, and the
    vision tower's patch groups, are split over. The batch size must divide by them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if batch_size % shards:
        raise ConfigError(
            f"batch_size {batch_size} does not divide over the "
            f"{shards} data-parallel devices of the mesh"
        )
    return shards


def make_data(cfg: TrainConfig, config: ModelConfig, model_path: str, vision_groups: int = 1):
    """The batch iterator: `data.train: synthetic` or the data pipeline over real records, with
    the batch's patches in `vision_groups` groups (`batch_shards`)."""
    d = dict(cfg.data)
    if not d.get("train"):
        raise ConfigError(
            "data.train is not set (a JSONL file, a `data` output folder, or synthetic)"
        )
    if d["train"] == "synthetic":
        import dataclasses

        from qwenvl_jax.data.pipeline import DataConfig
        from qwenvl_jax.train.synthetic import SyntheticBatches

        # the pipeline's own settings (loss_on, workers, ...) are accepted and do not apply
        known = {"distinct", "images"} | {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown synthetic data key {unknown[0]!r} (known: {sorted(known)})")
        return SyntheticBatches(
            config,
            cfg.batch_size,
            cfg.seq_len,
            seed=cfg.seed,
            distinct=int(d.get("distinct", 0)),
            images=bool(d.get("images", True)),
            max_patches=d.get("max_patches"),
            groups=vision_groups,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if not Path(model_path).is_dir():
        raise ConfigError(
            f"data.train {d['train']} needs a tokenizer: model= must be a "
            f"checkpoint folder, not the preset {model_path!r}"
        )
    from qwenvl_jax.data.pipeline import make_train_iterator
    from qwenvl_jax.processing.processor import Processor

    processor = Processor.from_pretrained(model_path)
    bounds = {
        k: v
        for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels))
        if v is not None
    }
    if bounds and hasattr(processor, "image_config"):
        processor.image_config = processor.image_config.updated(bounds)
    elif bounds:
        log.warning("%s images have a fixed size; min/max_pixels ignored", config.family)
    return make_train_iterator(cfg, processor, config, seed=cfg.seed, vision_groups=vision_groups)


def export_model(model: nnx.Module, folder: Path, source: str) -> None:
    """WORKDIR/model: an Orbax folder with the source's config.json and tokenizer/processor
    files (when the source is a checkpoint folder), written all-or-nothing."""
    from qwenvl_jax.loading import orbax_io
    from qwenvl_jax.loading.convert import copy_side_files, export_config
    from qwenvl_jax.loading.writer import atomic_dir

    src = Path(source)
    hf_config, marker = None, {}
    if src.is_dir():
        d = json.loads((src / "config.json").read_text())
        if "model_type" in d:
            dtype = str(jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype)
            hf_config = export_config(d, dtype)
        if orbax_io.is_orbax_folder(src) and "source" in orbax_io.read_marker(src):
            marker["source"] = orbax_io.read_marker(src)["source"]
    with atomic_dir(folder, overwrite=True) as tmp:
        orbax_io.save_model(model, tmp, config=hf_config, trained_from=str(source), **marker)
        if src.is_dir():
            copy_side_files(src, tmp)
    log.info("model written to %s", folder)


def _record(
    step: int, ms: list[dict], lr: float, dt: float, flops: float, peak: float, pad: float
) -> dict[str, Any]:
    """The metrics.jsonl record of one optimiser step: means over its micro-batches, throughput
    (tokens/s: non-padding tokens), and MFU = model FLOPs / time / peak of all devices."""
    mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    tokens = float(np.sum([m["tokens"] for m in ms]))
    rec = {
        "step": step,
        "loss": mean["loss"],
        "learning_rate": lr,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
        "ce": mean["ce"],
        "aux_loss": mean["aux_loss"],
        "grad_norm": mean["grad_norm"],
        "loss_tokens": float(np.sum([m["loss_tokens"] for m in ms])),
        "tokens": tokens,
        "padding_share": pad,
        "step_time_s": dt,
        "mfu": flops / dt / peak if dt > 0 else 0.0,
    }
    return rec


def train(cfg: TrainConfig, workdir: str | Path) -> int:
    """Run (or resume) training in `workdir`. Returns 0 when `cfg.steps` are done, or
    EXIT_PREEMPTED after a SIGTERM (a checkpoint of the last finished step is saved)."""
    workdir = Path(workdir)
    if not cfg.model:
        raise ConfigError(
            "model= is not set (a checkpoint folder, a previous run's WORKDIR, or a preset name)"
        )
    model_path = resolve_model_path(cfg.model)
    config = load_config(model_path)
    mesh = run_mesh(cfg.mesh, batch_size=cfg.batch_size, num_experts=config.text.num_experts)
    if cfg.mesh.auto and jax.process_index() == 0:
        print(f"mesh (auto): {dict(mesh.shape)}", flush=True)
    shards = batch_shards(mesh, cfg.batch_size)
    # the data (its files, the tokenizer it needs) is checked before anything is written
    data = make_data(cfg, config, model_path, vision_groups=shards)
    with contextlib.ExitStack() as cleanup:
        # Stop the pipeline's prefetch threads on the way out: left to interpreter shutdown,
        # Grain's iterator finalisers print tracebacks once their modules are gone.
        close = getattr(data, "close", None)
        if close is not None:
            cleanup.callback(close)
        workdir.mkdir(parents=True, exist_ok=True)
        ckpts = Checkpoints(
            workdir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints
        )
        cleanup.callback(ckpts.close)
        model = load_model(cfg, model_path, config, mesh, abstract=bool(ckpts.steps()))
        changed = blocks.configure(model, cfg.remat, cfg.scan_layers)
        trainer = Trainer(model, cfg, mesh)
        counts = summary(model, trainer.mask)
        del model
        log.info(
            "%s stage %d: %s trainable, %s frozen parameters; mesh %s; %s",
            config.family,
            cfg.stage,
            f"{counts['trainable']:,}",
            f"{counts['frozen']:,}",
            dict(mesh.shape),
            changed,
        )
        resumed = resume(ckpts, cfg, trainer)
        if resumed is not None:
            start, state, frozen, data_state = resumed
            trainer.set_frozen(frozen)
            data.set_state(data_state)
            log.info("resumed from %s at step %d", ckpts.directory, start)
        else:
            start = 0
            state = trainer.init_state()
            if jax.process_index() == 0:
                text = json.dumps(cfg.to_dict(), indent=2) + "\n"
                (workdir / "train_config.json").write_text(text)
        metrics = MetricsLog(workdir, resume_step=start, enabled=jax.process_index() == 0)
        cleanup.callback(metrics.close)
        cleanup.callback(metrics.plot)
        peak = peak_flops(jax.devices()[0], cfg.peak_flops)
        stop = StopSignal()
        cleanup.callback(stop.restore)
        step, status = start, 0
        pending: list[dict] = []
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not cfg.progress,
            unit="step",
            dynamic_ncols=True,
            desc=f"stage {cfg.stage}",
        )
        cleanup.callback(bar.close)
        while step < cfg.steps:
            micro, dt, pad, flops = [], 0.0, [], 0.0
            for _ in range(cfg.grad_accum):
                host = next(data)
                pad.append(padding_share(host))
                flops += step_flops(config, host)
                batch = trainer.put_batch(host)
                trainer.ensure_compiled(state, batch)
                t0 = time.perf_counter()
                state, m = trainer.step(state, batch)
                micro.append(jax.device_get(m))
                dt += time.perf_counter() - t0
            step += 1
            rec = _record(
                step,
                micro,
                trainer.learning_rate(step - 1),
                dt,
                flops,
                peak * mesh.size,
                float(np.mean(pad)),
            )
            pending.append(rec)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.write(_mean_records(pending))
                pending = []
            bar.set_postfix(
                loss=f"{rec['loss']:.4f}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
                mfu=f"{100 * rec.get('mfu', 0):.1f}%",
                refresh=False,
            )
            bar.update(1)
            if step % cfg.plot_every == 0:
                metrics.plot()
            if stop:
                ckpts.save(
                    step, state, trainer.frozen, data.get_state(), _meta(cfg, step), wait=True
                )
                log.warning("SIGTERM: stopped at step %d, checkpoint saved", step)
                status = EXIT_PREEMPTED
                break
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ckpts.save(step, state, trainer.frozen, data.get_state(), _meta(cfg, step))
    del data
    if status == 0:
        export_model(trainer.model(state), workdir / "model", model_path)
    return status


def resume(
    ckpts: Checkpoints, cfg: TrainConfig, trainer: Trainer
) -> tuple[int, Any, Any, Any] | None:
    """(step, state, frozen, data iterator state) of the newest checkpoint that reads back, or
    None when there is no checkpoint. Newer ones that do not read back are set aside, each with a
    warning; when none reads back, CheckpointError names the folder to remove."""
    unreadable: list[tuple[int, CheckpointError]] = []
    for step in ckpts.steps():
        try:
            _check_same_run(cfg, ckpts.meta(step), ckpts.directory)
            state, frozen, data_state, _ = ckpts.restore(
                step, trainer.abstract_state(), trainer.abstract_frozen()
            )
        except CheckpointError as e:
            unreadable.append((step, e))
            continue
        for bad, e in unreadable:
            moved = ckpts.set_aside(bad)
            log.warning("%s; moved to %s, resuming from checkpoint %d", e, moved.name, step)
        return step, state, frozen, data_state
    if not unreadable:
        return None
    newest, e = unreadable[0]
    if len(unreadable) == 1:
        raise CheckpointError(
            f"{e}; no other checkpoint: remove {ckpts.path(newest)} to start afresh"
        )
    raise CheckpointError(
        f"{e}; the {len(unreadable) - 1} older ones do not read back either: "
        f"remove {ckpts.directory} to start afresh"
    )


# Settings a resumed run must share with the run that wrote the checkpoints: they decide the
# layout of the saved state.
_STATE_KEYS = ("freeze", "param_dtype", "grad_accum", "clip_norm")


def _check_same_run(cfg: TrainConfig, meta: dict, directory: Path) -> None:
    saved = meta.get("config", {})
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, like the saved JSON
    for key in _STATE_KEYS:
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"{directory} holds checkpoints of a run with another {key} "
                f"({saved[key]!r}, now {now[key]!r}); use a new --workdir"
            )


def _mean_records(records: list[dict]) -> dict:
    if len(records) == 1:
        return records[0]
    out = dict(records[-1])
    for k in ("loss", "ce", "aux_loss", "grad_norm", "tokens_per_s", "mfu", "padding_share"):
        if k in out:
            out[k] = float(np.mean([r[k] for r in records]))
    return out


def _meta(cfg: TrainConfig, step: int) -> dict:
    return {"step": step, "time": time.time(), "config": cfg.to_dict()}


__all__ = [
    "EXIT_PREEMPTED",
    "export_model",
    "load_model",
    "batch_shards",
    "make_data",
    "resume",
    "run_mesh",
    "train",
]
