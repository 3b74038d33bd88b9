"""Test-wide settings: parity tests compare float32 results, so matmuls run at full precision;
and the v5p slice the TPU-compile tests share."""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def v5p_mesh():
    """A v5p:2x2x2 slice (8 chips) as the mesh (data=2, fsdp=2, tensor=2), at the matmul
    precision training runs at (the tests' float32 "highest" asks the bfloat16 kernels for
    float32 products, which Mosaic refuses)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "qwenvl_jax[tpu]"): no TPU compiler')
    from qwenvl_jax.sharding import make_mesh, use_mesh
    from qwenvl_jax.train.plan import topology

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=topology("v5p:2x2x2").devices)
    with jax.default_matmul_precision("default"), use_mesh(mesh):
        yield mesh
