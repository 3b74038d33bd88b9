"""The configuration files shipped with the package: model presets, training stage configs and
demo configs. They live in the repository's configs/ folder, which pyproject.toml installs as the
package `qwenvl_jax.configs`; they are found through importlib.resources, so a wheel installed
anywhere finds them as an editable install does."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def config_dir(kind: str) -> Path:
    """The folder of one kind of shipped config: "models", "train" or "demo"."""
    root = importlib.resources.files("qwenvl_jax.configs")
    if not isinstance(root, Path):  # a zipped install: no folders to list
        raise RuntimeError(f"qwenvl_jax.configs is not a folder on disk ({root}); install unzipped")
    return root / kind
