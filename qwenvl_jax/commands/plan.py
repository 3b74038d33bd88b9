"""`qwenvl-jax plan [--config FILE] [KEY=VALUE ...] --topology NAME [--json]`.

Compiles the train step that `qwenvl-jax train` would run with the same config and overrides for
a device topology, without weights or data, and prints per-chip memory (parameters, optimizer
state, frozen parameters, batch, temporaries, total) against the chip's HBM, whether it fits, the
compile time and the estimated step time and MFU. A step that does not fit exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="compile the train step for a TPU topology (or cpu:N) and report memory and speed",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="topologies: v4:2x2x2, v5e:4x4, v5p:2x2x2, v5p:4x4x8, v6e:8x8, ... (libtpu: "
        'pip install "qwenvl_jax[tpu]"), or cpu:N (N host devices). overrides: as for train '
        "(model=PRESET_OR_PATH stage=2 batch_size=16 seq_len=4096 remat=full mesh.fsdp=8 ...)",
    )
    p.add_argument("--config", default=None, help="a training config (YAML or JSON)")
    p.add_argument("--topology", required=True, metavar="NAME", help="e.g. v5p:2x2x2 or cpu:8")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hlo", metavar="FILE", help="also write the compiled step's HLO text there")
    p.add_argument(
        "--no-loop-timing",
        action="store_true",
        help="compile once: scale the step's time by the loops' FLOPs instead of timing the "
        "loop bodies with a second compile (layer scans unrolled twice)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return p


def _host_devices(topology: str) -> None:
    """cpu:N asks for N host devices: set before JAX starts its CPU backend."""
    kind, _, n = topology.partition(":")
    if kind == "cpu" and n.isdigit():
        import jax

        # refused once the backend is up: topology() then says how many devices there are
        with contextlib.suppress(RuntimeError):
            if jax.config.jax_num_cpu_devices < int(n):
                jax.config.update("jax_num_cpu_devices", int(n))


def run(args: argparse.Namespace) -> int:
    from qwenvl_jax.train.config import load_train_config
    from qwenvl_jax.train.plan import GIB, format_plan, plan

    cfg = load_train_config(args.config, list(args.overrides))
    _host_devices(args.topology)
    report = plan(cfg, args.topology, hlo_path=args.hlo, time_loops=not args.no_loop_timing)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    if not report["fits"]:
        c = report["per_chip_bytes"]
        print(
            f"qwenvl-jax plan: error: the step needs {c['total'] / GIB:.1f} GiB per chip "
            f"({c['temporaries'] / GIB:.1f} GiB temporaries), {args.topology} has "
            f"{report['hbm_bytes'] / GIB:.1f} GiB",
            file=sys.stderr,
        )
        return 2
    return 0
