"""The training input pipeline on Grain: source -> shard by process -> seeded shuffle (a new order
each epoch) -> repeat -> transform (threads) -> pack -> worker processes / prefetch -> batches.

    it = make_train_iterator(config, processor, model_config, seed=0)
    batch = next(it)                   # the dict of batch.py
    it.stats                           # DataStats: samples, skipped by reason, padding share
    ckpt = ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), ...)   # Orbax

`TrainIterator` is a Grain `DatasetIterator`: its state (`get_state` / `set_state`, JSON) holds the
whole pipeline's position and the counters, so Grain's Orbax handler
(`grain.checkpoint.CheckpointSave/CheckpointRestore`, or the iterator itself as an Orbax v1
checkpointable) saves and restores it, and a restored run sees exactly the batches it would have.
The state is only valid for the same data, config, seed and number of workers.

Multi-host: process p of P reads records p, p+P, ... of the source (disjoint, together all of
it); each process packs its own batches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import grain

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.data.packing import PackIterDataset
from qwenvl_jax.data.sources import RawRecord, open_source
from qwenvl_jax.data.stats import DataStats, SkipPolicy
from qwenvl_jax.data.transforms import LOSS_ON, Example, SampleTransform, Skipped
from qwenvl_jax.errors import ConfigError

logger = logging.getLogger(__name__)
LOG_EVERY = 100  # batches between the INFO lines with the counters and the padding share


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The `data` section of a training config (batch_size, seq_len and seed live at the top).

    batch_size: rows of the global batch; each of P processes makes batches of batch_size / P
      rows (it must divide);

    train: a JSONL file, a `qwenvl-jax data` output folder, an .array_record file, or
      `tfds:NAME[:SPLIT]` (with `tfds_data_dir`);
    max_patches: ViT patches of one process's batch (Qwen2/2.5/3-VL; default 2 * rows *
      seq_len, a multiple of 4); max_images: images of one process's batch (Qwen-VL v1; default
      rows * max(1, seq_len // 512)). 0 makes a text-only run;
    loss_on: "assistant" or "all"; strict: a bad sample is an error instead of a counted skip;
    shuffle / num_epochs (None: repeat forever); num_workers: Grain worker processes (0: this
    process); read_threads: threads per process running the transforms; prefetch: batches
    buffered ahead; max_pending: examples that may wait for a later batch (default: the rows);
    max_consecutive_skips: that many bad samples in a row is an error (the data is unusable).
    """

    train: str
    batch_size: int = 8
    seq_len: int = 2048
    max_patches: int | None = None
    max_images: int | None = None
    loss_on: str = "assistant"
    strict: bool = False
    shuffle: bool = True
    num_epochs: int | None = None
    num_workers: int = 0
    read_threads: int = 4
    prefetch: int = 2
    max_pending: int | None = None
    max_consecutive_skips: int = 1000
    tfds_data_dir: str | None = None

    @classmethod
    def from_any(cls, config: Any) -> DataConfig:
        """A DataConfig from itself, a mapping (the `data` section, which may also hold
        batch_size / seq_len) or a run config with `.data`, `.batch_size` and `.seq_len`."""
        if isinstance(config, DataConfig):
            return config
        if isinstance(config, Mapping):
            d = dict(config)
        elif hasattr(config, "data"):
            d = {**dict(config.data), "batch_size": config.batch_size, "seq_len": config.seq_len}
        else:
            raise ConfigError(f"cannot read a data config from {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown data config key {unknown[0]!r} (known: {sorted(names)})")
        if not d.get("train"):
            raise ConfigError("data.train is not set (a JSONL file, a data folder or tfds:NAME)")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "read_threads", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"data.loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.max_patches is not None and (self.max_patches < 0 or self.max_patches % 4):
            raise ConfigError(f"data.max_patches must be a multiple of 4, got {self.max_patches}")

    def rows(self, process_count: int) -> int:
        """Rows of each process's batches."""
        if self.batch_size % process_count:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of the {process_count} processes"
            )
        return self.batch_size // process_count

    def patch_budget(self, model_config: ModelConfig, rows: int) -> tuple[int, int]:
        """(max_patches, max_images) of a batch of `rows` rows for this family, defaults filled
        in."""
        if model_config.capabilities.fixed_size_images:
            images = self.max_images
            if images is None:
                images = rows * max(1, self.seq_len // 512)
            return 0, images
        patches = self.max_patches
        if patches is None:
            patches = 2 * rows * self.seq_len
        return patches, 0


class _SafeTransform(grain.transforms.Map):
    """The sample transform with bad samples turned into Skipped markers (or raised, strict)."""

    def __init__(self, transform: SampleTransform, strict: bool) -> None:
        self.transform = transform
        self.policy = SkipPolicy(strict)

    def map(self, record: RawRecord) -> Example | Skipped:
        try:
            return self.transform(record)
        except Exception as e:  # a long run never dies of one sample; strict re-raises
            reason = self.policy.handle(e, record.key)
            return Skipped(reason, record.key, f"{type(e).__name__}: {e}")


class TrainIterator(grain.DatasetIterator):
    """Batches of the pipeline; keeps the counters (`stats`) and checkpoints with them."""

    def __init__(self, parent: grain.DatasetIterator) -> None:
        super().__init__(parent)
        self.stats = DataStats()

    def __next__(self) -> dict[str, Any]:
        batch, stats = next(self._parent)
        self.stats.add(DataStats.from_dict(stats))
        if self.stats.batches % LOG_EVERY == 0:
            logger.info("data: %s", self.stats.describe())
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "stats": self.stats.to_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.stats = DataStats.from_dict(state["stats"])

    @property
    def padding_share(self) -> float:
        """1 - filled token slots / all slots, over the batches so far."""
        return self.stats.padding_share


def make_train_iterator(
    config: Any,
    processor: Any,
    model_config: ModelConfig,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int = 0,
    vision_groups: int | None = None,
) -> TrainIterator:
    """The batch iterator of one process. `config`: a DataConfig, the `data` mapping, or a run
    config (see `DataConfig.from_any`); `processor`: the checkpoint's Processor; process
    index/count default to JAX's; `vision_groups`: the groups the global batch's patches are
    split into (the trainer's data-parallel shards; default one a process), each process making
    its share of them."""
    cfg = DataConfig.from_any(config)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    rows = cfg.rows(process_count)
    max_patches, max_images = cfg.patch_budget(model_config, rows)
    vision_groups = process_count if vision_groups is None else vision_groups
    groups = vision_groups // process_count
    if (
        vision_groups < 1
        or vision_groups % process_count
        or rows % groups
        or max_patches % (4 * groups)
    ):
        raise ConfigError(
            f"{vision_groups} vision groups over {process_count} processes do not divide their "
            f"{rows} rows and {max_patches} patches (multiples of 4)"
        )
    source = open_source(cfg.train, tfds_data_dir=cfg.tfds_data_dir)
    written_for = getattr(source, "metadata", {}).get("family")
    if written_for and written_for != model_config.family:
        logger.warning(
            "%s was prepared for %s, the model is %s", cfg.train, written_for, model_config.family
        )
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ConfigError(f"{cfg.train}: no records for process {process_index} of {process_count}")
    records = len(ds)
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(cfg.num_epochs)
    transform = SampleTransform(
        processor,
        model_config,
        loss_on=cfg.loss_on,
        max_tokens=cfg.seq_len,
        max_patches=max_patches // groups,
        max_images=max_images,
    )
    ds = ds.map(_SafeTransform(transform, cfg.strict))
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)
    )
    iter_ds = PackIterDataset(
        iter_ds,
        model_config,
        rows,
        cfg.seq_len,
        max_patches=max_patches,
        max_images=max_images,
        groups=groups,
        max_pending=cfg.max_pending,
        max_consecutive_skips=cfg.max_consecutive_skips,
    )
    if cfg.num_workers:
        _absl_flags_ready()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch)
            )
        )
    elif cfg.prefetch:
        iter_ds = grain.experimental.ThreadPrefetchIterDataset(
            iter_ds, prefetch_buffer_size=cfg.prefetch
        )
    logger.info(
        "data: %s, process %d/%d, %d records here, batch %dx%d, patches %d in %d groups, images %d",
        source,
        process_index,
        process_count,
        records,
        rows,
        cfg.seq_len,
        max_patches,
        groups,
        max_images,
    )
    return TrainIterator(iter(iter_ds))


def _absl_flags_ready() -> None:
    """Grain's worker processes read absl flags; outside an absl program nobody parsed them, so
    their defaults are taken as final."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def checkpoint_save(iterator: TrainIterator) -> Any:
    """The Orbax argument that saves the iterator (`ocp.args.Composite(data=...)`)."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore(iterator: TrainIterator) -> Any:
    """The Orbax argument that restores a freshly made iterator in place."""
    return grain.checkpoint.CheckpointRestore(iterator)
