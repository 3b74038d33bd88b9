"""`qwenvl-jax demo`: the whole system on one machine, from nothing.

    results = run_demo("qwenvl_demo")

1. Data: seeded synthetic scenes (demo/shapes.py), a training split and a held-out split, as
   JSONL conversations plus PNG images, then converted to ArrayRecord shards by the data
   pipeline (`qwenvl-jax data`'s library function).
2. Model: a scaled-down Qwen-VL with random weights and its own small BPE vocabulary, written as
   a Hugging Face checkpoint folder (demo/model.py).
3. Training: the real training loop with the real stage configs
   (configs/train/<family>_stage{1,2,3}.yaml) and the demo's overrides (configs/demo/<family>.yaml);
   each stage starts from the previous stage's `model/`.
4. Evaluation on the held-out scenes with jitted greedy generation (demo/evaluate.py): a table,
   `results.json`, `predictions.png`, and `WORKDIR/model/` (the last stage's model, which
   `qwenvl-jax generate --model WORKDIR/model` answers from).

Every step is resumable: started again on the same WORKDIR with the same settings, finished steps
are kept and training resumes from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from qwenvl_jax.demo.model import DemoModelSize, write_initial_checkpoint
from qwenvl_jax.demo.shapes import TASKS, write_split
from qwenvl_jax.errors import ConfigError, InputError
from qwenvl_jax.resources import config_dir

log = logging.getLogger(__name__)

DEMO_CONFIG_DIR = config_dir("demo")
SETTINGS_FILE = "demo.json"
SUPPORTED = ("qwen_vl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Special-token text is not for the BPE: v1's <ref>/<box>/<img> tags and <|...|> tokens.
_SPECIAL_TEXT = re.compile(r"<\|[^|<>]*\|>|</?(?:ref|box|quad|img)>")


def load_demo_config(family: str) -> dict[str, Any]:
    """configs/demo/<family>.yaml as a dict (model, data, train, stages)."""
    from qwenvl_jax.train.config import read_file

    path = DEMO_CONFIG_DIR / f"{family}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no demo for family {family!r} (demo configs: "
            f"{sorted(p.stem for p in DEMO_CONFIG_DIR.glob('*.yaml'))})"
        )
    cfg = read_file(path)
    missing = sorted({"model", "data", "train", "stages"} - set(cfg))
    if missing:
        raise ConfigError(f"{path}: lacks the section {missing[0]!r}")
    return cfg


def scaled(n: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def _overrides(section: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested mapping as KEY=VALUE overrides (dotted keys, JSON values YAML reads back)."""
    out = []
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("mesh",):
            out += _overrides(value, name + ".")
        else:
            out.append(f"{name}={json.dumps(value)}")
    return out


def _check_settings(workdir: Path, settings: dict[str, Any]) -> None:
    """A WORKDIR belongs to one set of demo settings: resuming with others would mix runs."""
    path = workdir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as read back: mapping keys become strings
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise InputError(
                f"{workdir} holds a demo run with other settings ({', '.join(changed)}"
                "); use another --workdir or delete it"
            )
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _texts(jsonl: Path, family: str, image_size: int) -> list[str]:
    """The texts of a split's conversations (questions, answers, boxes written as `family`
    writes them) and the chat template's own words: what the demo's BPE vocabulary is trained
    on. Special-token text is left out."""
    from qwenvl_jax.grounding import format_box
    from qwenvl_jax.processing.qwen_vl_v1 import DEFAULT_SYSTEM

    texts = [DEFAULT_SYSTEM, "system", "user", "assistant", "Picture 1: "]
    with open(jsonl) as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                for item in message["content"]:
                    if item.get("type") == "box":
                        text = format_box(
                            item["label"], item["box"], family, (image_size, image_size)
                        )
                    else:
                        text = item.get("text") or ""
                    texts.append(_SPECIAL_TEXT.sub("\n", text))
    return texts


def make_data(
    workdir: Path, cfg: dict[str, Any], family: str, scale: float, progress: bool
) -> dict[str, Path]:
    """The train and held-out splits (JSONL + images) and the train split's ArrayRecord shards."""
    from qwenvl_jax.data.arrayrecord import convert_jsonl

    data = workdir / "data"
    size = cfg["model"].get("image_size", DemoModelSize().image_size)
    scene = dict(cfg["data"].get("scene", {}))
    repeat = cfg["data"].get("repeat")  # training weights; the held-out split asks each once
    splits = {
        "train": (scaled(cfg["data"]["train_scenes"], scale, 8), 1, repeat),
        "heldout": (scaled(cfg["data"]["heldout_scenes"], scale, 4), 2, None),
    }
    for name, (n, seed, weights) in splits.items():
        if not (data / name / "scenes.json").is_file():
            write_split(
                data / name,
                n,
                seed=seed,
                size=size,
                progress=progress,
                per_conversation=int(cfg["data"].get("per_conversation", 1)),
                tasks=tuple(cfg["data"].get("tasks", TASKS)),
                repeat=weights,
                **scene,
            )
    records = data / "train_records"
    if not (records / "metadata.json").is_file():
        from tqdm import tqdm

        bar = (lambda it: tqdm(it, desc="data: records", unit="sample")) if progress else None
        stats = convert_jsonl(
            data / "train" / "data.jsonl",
            records,
            overwrite=True,
            metadata={"family": family, "source": "qwenvl_jax.demo"},
            progress=bar,
        )
        log.info("train records: %s", stats.summary())
    return {"train": data / "train", "heldout": data / "heldout", "records": records}


def train_stages(
    workdir: Path, cfg: dict[str, Any], init: Path, records: Path, scale: float, progress: bool
) -> Path:
    """Stages 1, 2 and 3 with the real training loop; returns the last stage's model folder."""
    from qwenvl_jax.train.config import load_train_config
    from qwenvl_jax.train.loop import train

    model = init
    common = dict(cfg["train"])
    for stage in (1, 2, 3):
        over = {**common, **cfg["stages"].get(stage, cfg["stages"].get(str(stage), {}))}
        steps = scaled(int(over.pop("steps")), scale)
        over["warmup_steps"] = min(int(over.get("warmup_steps", 0)), steps - 1)
        items = [
            f"model={model}",
            f"stage={stage}",
            f"data.train={records}",
            f"steps={steps}",
            f"checkpoint_every={steps}",
            f"progress={json.dumps(progress)}",
        ]
        items += _overrides(over)
        train_cfg = load_train_config(None, items)
        status = train(train_cfg, workdir / f"stage{stage}")
        if status != 0:
            raise InputError(
                f"stage {stage} stopped early (status {status}); run the demo again to resume"
            )
        model = workdir / f"stage{stage}" / "model"
    return model


def run_demo(
    workdir: str | Path = "qwenvl_demo",
    family: str = "qwen_vl",
    *,
    scale: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Data, the initial model, three training stages and the held-out evaluation in
    `workdir`; returns the results (also written to WORKDIR/results.json)."""
    from qwenvl_jax.demo.evaluate import evaluate
    from qwenvl_jax.loading.writer import atomic_dir

    if family not in SUPPORTED:
        raise ConfigError(f"the demo runs family {' or '.join(SUPPORTED)}, not {family!r}")
    if not scale > 0:
        raise InputError(f"--scale must be > 0, got {scale}")
    start = time.perf_counter()
    workdir = Path(workdir)
    cfg = load_demo_config(family)
    _check_settings(workdir, {"family": family, "scale": scale, "seed": seed, "config": cfg})

    paths = make_data(workdir, cfg, family, scale, progress)
    init = workdir / "init"
    if not (init / "config.json").is_file():
        size = DemoModelSize.from_dict(cfg["model"])
        texts = _texts(paths["train"] / "data.jsonl", family, size.image_size)
        write_initial_checkpoint(init, size, texts, seed=seed, family=family)
    final = train_stages(workdir, cfg, init, paths["records"], scale, progress)
    with atomic_dir(workdir / "model", overwrite=True) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)

    results = evaluate(workdir / "model", paths["heldout"], workdir, family, progress=progress)
    results["minutes"] = round((time.perf_counter() - start) / 60, 2)
    results["family"] = family
    results["scale"] = scale
    out = workdir / "results.json"
    tmp_file = out.with_name(".results.json.tmp")
    tmp_file.write_text(json.dumps(results, indent=2) + "\n")
    tmp_file.replace(out)
    return results
