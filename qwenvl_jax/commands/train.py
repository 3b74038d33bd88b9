"""`qwenvl-jax train [--config FILE] [--workdir DIR] [KEY=VALUE ...]`.

Trains one stage (see configs/train/). Without --config, `model=` and `stage=` pick the family's
stage config. Writes DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard, DIR/loss.png,
Orbax checkpoints in DIR/checkpoints and the trained model in DIR/model; started again on the
same DIR it resumes from the newest checkpoint that reads back (one that does not is renamed
<step>.unreadable, with a warning). SIGTERM saves a checkpoint and exits with 143.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train (or resume) one stage: freezing, AdamW, checkpoints, metrics",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: model=PATH_OR_PRESET stage=1|2|3 data.train=PATH steps=N "
        "batch_size=N seq_len=N learning_rate=F checkpoint_every=N seed=N, and any other "
        "key of the config, dotted (mesh.fsdp=4, data.max_patches=4096)",
    )
    p.add_argument("--config", default=None, help="a training config (YAML or JSON)")
    p.add_argument("--workdir", default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = p.add_argument_group(
        "multi-process runs",
        "one process per host, all with the same config and --workdir (on TPU VMs and SLURM "
        "the cluster is found without these)",
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax import multihost
    from qwenvl_jax.train.config import load_train_config
    from qwenvl_jax.train.loop import train

    cfg = load_train_config(args.config, list(args.overrides))
    multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.no_progress or not multihost.is_lead():
        cfg = cfg.replace(progress=False)
    return train(cfg, args.workdir)
