"""Inference: jitted KV-cache generation (`generate`, `Generator`) and token sampling."""

from qwenvl_jax.inference.generate import GenerateOutput, Generator, generate

__all__ = ["GenerateOutput", "Generator", "generate"]
