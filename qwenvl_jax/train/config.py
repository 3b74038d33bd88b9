"""The run config of `qwenvl-jax train`: one frozen dataclass, read from a YAML (or JSON) file,
with `KEY=VALUE` overrides on dotted keys, checked up front so bad settings fail in one line.

A stage config under configs/train/ holds what differs between the three training stages (which
parameters train, the optimiser schedule, the image resolution); everything else has a default
here. Without `--config`, `model=` and `stage=` pick `configs/train/<family>_stage<N>.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_jax.errors import ConfigError
from qwenvl_jax.resources import config_dir

CONFIG_DIR = config_dir("train")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices per mesh axis; one axis may be -1 (all remaining devices). `mesh: auto` (auto=True)
    leaves the choice to `resolve_mesh`, once the device count and the model are known."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    auto: bool = False


def resolve_mesh(mc: MeshConfig, devices: int, batch_size: int, num_experts: int = 0) -> MeshConfig:
    """The mesh to run on: `mc` itself unless it is auto. Auto: expert parallelism for a mixture
    of experts (a power of two up to 8 dividing the experts, the devices and the batch), FSDP over
    as many of the remaining devices as the batch's rows divide over, tensor parallelism over the
    rest (a batch with fewer rows than devices still uses every device)."""
    if not mc.auto:
        return mc
    expert = math.gcd(math.gcd(devices, num_experts), 8) if num_experts else 1
    while expert > 1 and batch_size % expert:
        expert //= 2
    rest = devices // expert
    fsdp = math.gcd(rest, batch_size // expert)
    return MeshConfig(data=1, fsdp=fsdp, tensor=rest // fsdp, expert=expert)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs besides the weights and the data files.

    `freeze` is an ordered table of (regex, "train" | "freeze") over dotted parameter paths such
    as `visual.runs.0.attn.qkv.kernel`; the first full match decides, and a parameter that no
    row matches is an error, so a table is always complete. `batch_size` is the rows of one
    micro-batch; an optimiser step consumes `grad_accum` micro-batches. `steps` counts optimiser
    steps. `data` is handed to the data pipeline as is (its keys are the pipeline's).

    `lr_scale` is an ordered table of (regex, factor): a trainable parameter whose path a row
    fully matches (the first such row) takes `factor` times the learning rate, its weight decay
    included (a smaller rate for a randomly initialised or fragile part, as vision-LR options
    do); parameters no row matches take the rate as is.
    """

    model: str | None = None
    stage: int = 1
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 2048
    grad_accum: int = 1
    seed: int = 0
    # optimiser: AdamW, linear warmup then cosine to end_learning_rate_ratio * peak
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    end_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # extra regexes whose parameters get no weight decay (1-D parameters never get any)
    no_decay: tuple[str, ...] = ()
    freeze: tuple[tuple[str, str], ...] = ((".*", "train"),)
    lr_scale: tuple[tuple[str, float], ...] = ()
    # numerics and memory
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights and optimiser state
    remat: str = "none"  # none | full | dots | dots_no_batch (per decoder / ViT block)
    scan_layers: bool = False  # accepted for old configs: decoder layers are always scanned
    # The loss maps hidden states to logits this many positions of a row at a time (recomputed
    # in the backward pass), so float32 logits of the whole batch never exist; 0: all at once.
    loss_chunk: int = 512
    aux_loss_coef: float | None = None  # MoE load balancing; None: the model config's value
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # checkpoints and logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 1
    plot_every: int = 100
    progress: bool = True
    peak_flops: float | None = None  # per device; None: a table by device kind, or measured
    data: dict = field(default_factory=dict)
    # image resolution bounds for the processor (None: the checkpoint's preprocessor_config)
    min_pixels: int | None = None
    max_pixels: int | None = None

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "model=x"] -> {"a": {"b": 1}, "model": "x"}; values are parsed as YAML."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"bad override {item!r} (expected KEY=VALUE)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def read_file(path: str | Path) -> dict:
    """A config file (YAML or JSON) as a dict."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = p.read_text()
        d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a valid config file ({first})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    return d


# Mappings that are tables: an override replaces them whole.
_TABLES = ("freeze", "lr_scale")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _TABLES:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def stage_config_path(family: str, stage: int) -> Path:
    return CONFIG_DIR / f"{family}_stage{stage}.yaml"


def _as_type(name: str, value: Any, default: Any) -> Any:
    """Coerce a value to the type of the field's default (ints and floats from YAML text)."""
    if default is None or value is None:
        return value
    t = type(default)
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise ValueError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            if not isinstance(value, str | int | float):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {t.__name__}, got {value!r}") from None
    return value


def from_dict(d: dict) -> TrainConfig:
    """A validated TrainConfig from a (merged) dict; unknown keys are an error."""
    d = dict(d)
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown training config key {unknown[0]!r}")
    defaults = TrainConfig()
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k == "mesh":
            if v == "auto" or (isinstance(v, dict) and v.get("auto") is True):
                kw[k] = MeshConfig(auto=True)
                continue
            if not isinstance(v, dict):
                raise ConfigError("mesh: expected auto or a mapping of data/fsdp/tensor/expert")
            v = {a: n for a, n in v.items() if a != "auto" or n is not False}
            mnames = {f.name for f in dataclasses.fields(MeshConfig)} - {"auto"}
            bad = sorted(set(v) - mnames)
            if bad:
                raise ConfigError(f"unknown mesh axis {bad[0]!r} (use data, fsdp, tensor, expert)")
            kw[k] = MeshConfig(**{a: _as_type(f"mesh.{a}", n, 1) for a, n in v.items()})
        elif k == "freeze":
            kw[k] = _regex_table(k, v, "[regex, train|freeze]", _freeze_action)
        elif k == "lr_scale":
            kw[k] = () if v is None else _regex_table(k, v, "[regex, factor]", _lr_factor)
        elif k == "no_decay":
            if isinstance(v, str):
                v = [v]
            kw[k] = tuple(str(x) for x in (v or ()))
        elif k == "data":
            if not isinstance(v, dict):
                raise ConfigError("data: expected a mapping")
            kw[k] = dict(v)
        elif k == "model":
            kw[k] = None if v is None else str(v)
        elif k in ("aux_loss_coef", "peak_flops"):
            kw[k] = None if v is None else _as_type(k, v, 0.0)
        elif k in ("min_pixels", "max_pixels"):
            kw[k] = None if v is None else _as_type(k, v, 0)
        else:
            kw[k] = _as_type(k, v, getattr(defaults, k))
    cfg = TrainConfig(**kw)
    validate(cfg)
    return cfg


def _regex_table(name: str, v: Any, shape: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """A table of [regex, x] rows (or a {regex: x} mapping, in file order) as a tuple of
    (regex, value(regex, x)); `shape` names the row in errors."""
    if isinstance(v, dict):
        v = list(v.items())
    if not isinstance(v, list | tuple):
        raise ConfigError(f"{name}: expected a list of {shape} rows")
    rows = []
    for row in v:
        if not (isinstance(row, list | tuple) and len(row) == 2):
            raise ConfigError(f"{name}: bad row {row!r} (expected {shape})")
        pattern = str(row[0])
        converted = value(pattern, row[1])
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{name}: bad regex {pattern!r} ({e})") from None
        rows.append((pattern, converted))
    return tuple(rows)


def _freeze_action(pattern: str, action: Any) -> str:
    if str(action) not in ("train", "freeze"):
        raise ConfigError(
            f"freeze: action of {pattern!r} must be train or freeze, not {str(action)!r}"
        )
    return str(action)


def _lr_factor(pattern: str, raw: Any) -> float:
    try:
        factor = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"lr_scale: factor of {pattern!r} must be a number, not {raw!r}"
        ) from None
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(
            f"lr_scale: factor of {pattern!r} must be > 0 (freeze a part "
            f"with the freeze table), got {raw!r}"
        )
    return factor


def validate(cfg: TrainConfig) -> None:
    def positive(name: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    if cfg.stage not in (1, 2, 3):
        raise ConfigError(f"stage must be 1, 2 or 3, got {cfg.stage}")
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "plot_every",
    ):
        positive(name, getattr(cfg, name))
    positive("learning_rate", cfg.learning_rate, allow_zero=True)
    positive("warmup_steps", cfg.warmup_steps, allow_zero=True)
    positive("weight_decay", cfg.weight_decay, allow_zero=True)
    positive("clip_norm", cfg.clip_norm, allow_zero=True)
    positive("loss_chunk", cfg.loss_chunk, allow_zero=True)
    if not 0 <= cfg.end_learning_rate_ratio <= 1:
        raise ConfigError("end_learning_rate_ratio must be within [0, 1]")
    if cfg.dtype not in DTYPES or cfg.param_dtype not in DTYPES:
        raise ConfigError(f"dtype and param_dtype must be one of {DTYPES}")
    if cfg.remat not in REMAT_POLICIES:
        raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {cfg.remat!r}")
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.expert)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive with at most one -1, got {cfg.mesh}")
    for p in cfg.no_decay:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"no_decay: bad regex {p!r} ({e})") from None


def load_train_config(config_file: str | Path | None, overrides: list[str]) -> TrainConfig:
    """The run config: the file (or the family's stage config), then the overrides on top."""
    over = parse_overrides(overrides)
    if config_file is None:
        model = over.get("model")
        if not model:
            raise ConfigError("train needs --config FILE, or model=PATH_OR_PRESET (and stage=N)")
        from qwenvl_jax.config import load_config

        family = load_config(resolve_model_path(str(model))).family
        stage = _as_type("stage", over.get("stage", 1), 1)
        if stage not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3, got {stage}")
        path = stage_config_path(family, stage)
        if not path.is_file():
            raise ConfigError(f"no stage {stage} config for {family} ({path.name})")
        base = read_file(path)
    else:
        base = read_file(config_file)
    return from_dict(_merge(base, over))


def resolve_model_path(model: str) -> str:
    """A previous run's WORKDIR stands for its exported WORKDIR/model folder."""
    p = Path(model)
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return str(p / "model")
    return model


__all__ = [
    "CONFIG_DIR",
    "MeshConfig",
    "resolve_mesh",
    "TrainConfig",
    "from_dict",
    "load_train_config",
    "parse_overrides",
    "read_file",
    "resolve_model_path",
    "stage_config_path",
]
