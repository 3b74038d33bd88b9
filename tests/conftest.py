"""Test-wide settings: parity tests compare float32 results, so matmuls run at full precision;
and the v5p slice the TPU-compile tests share."""

import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the whole run, made by the first process (pytest itself) and
# inherited by the xdist workers and the CLI subprocesses they start: the same tiny models' inits
# and steps compile once instead of once per test and process. Removed when the run ends.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="qwenvl_jax_tests_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


def pytest_sessionfinish(session):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
