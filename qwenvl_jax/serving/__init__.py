"""Serving: the continuous-batching engine (`Engine`) and the OpenAI-compatible app
(`create_app`), run by `qwenvl-jax serve`."""

from qwenvl_jax.serving.engine import Engine

__all__ = ["Engine", "create_app"]


def __getattr__(name):
    if name == "create_app":  # FastAPI is imported on first use
        from qwenvl_jax.serving.api import create_app

        return create_app
    raise AttributeError(name)
