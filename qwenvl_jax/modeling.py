"""Models from checkpoints: `from_pretrained` builds the abstract model of a folder's config
(`models.build`) and fills it through the one loader (`loading.load`: every key planned on
stand-ins first, then one tensor at a time placed straight into its sharded array, so the
checkpoint is never held twice in host memory), or restores an Orbax folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwenvl_jax.config import load_config
from qwenvl_jax.models.build import DTYPES, as_dtype, build_model, model_class

__all__ = [
    "DTYPES",
    "as_dtype",
    "build_model",
    "from_pretrained",
    "model_class",
    "param_count",
    "params_as_numpy",
]


def param_count(model: nnx.Module) -> int:
    """Number of parameters, for concrete and abstract models alike."""
    state = nnx.state(model, nnx.Param)
    return int(sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)))


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def params_as_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Flat {checkpoint path: host array} of every parameter, one entry per decoder layer and ViT
    block as in checkpoints (gathered; use for small models)."""
    from qwenvl_jax.loading.stacking import checkpoint_view

    state = nnx.state(model, nnx.Param)
    flat = {path_str(p): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(state)}
    return checkpoint_view(flat, model.config)


def from_pretrained(
    path: str | Path,
    dtype: Any = "bfloat16",
    mesh: Mesh | None = None,
    *,
    abstract: bool = False,
    param_dtype: Any = None,
    progress: bool = False,
) -> nnx.Module:
    """A model from a Hugging Face checkpoint folder or a `qwenvl-jax convert` folder (see
    INTERFACE.md). abstract=True reads config.json alone."""
    config = load_config(path)
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    if abstract:
        return build_model(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True)
    folder = Path(path)
    from qwenvl_jax.loading import load, orbax_io
    from qwenvl_jax.loading.mapping import mapping_for
    from qwenvl_jax.models.mtp import fit_mtp

    if orbax_io.is_orbax_folder(folder):
        config = fit_mtp(config, orbax_io.stored_params(folder))
        abs_model = build_model(
            config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True
        )
        return orbax_io.restore_model(folder, abs_model)
    # FP8 weights are dequantised on read (then cast to the parameter dtype), experts fused.
    with load.open_weights(folder, load.read_hf_config(folder), "float32") as reader:
        config = fit_mtp(config, reader.keys())
        abs_model = build_model(
            config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, abstract=True
        )
        return load.fill_model(abs_model, reader, mapping_for(config), progress=progress)
