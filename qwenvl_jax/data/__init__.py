"""Training data: sources (JSONL, ArrayRecord shards, TFDS), the per-sample transform (shared with
the inference processor), packing into fixed-shape batches, and the Grain pipeline.

The batch contract the trainer relies on is in `qwenvl_jax.data.batch`.
"""

from qwenvl_jax.data.batch import batch_spec, batch_to_model_inputs, padding_share
from qwenvl_jax.data.pipeline import DataConfig, TrainIterator, make_train_iterator
from qwenvl_jax.data.stats import DataStats, SampleError

__all__ = [
    "DataConfig",
    "DataStats",
    "SampleError",
    "TrainIterator",
    "batch_spec",
    "batch_to_model_inputs",
    "make_train_iterator",
    "padding_share",
]
