"""qwenvl_jax: the Qwen-VL family (Qwen-VL v1, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) in
JAX / Flax NNX."""

from qwenvl_jax.config import ModelConfig, load_config
from qwenvl_jax.errors import CheckpointError, ConfigError, InputError, QwenVLError
from qwenvl_jax.modeling import build_model, from_pretrained, param_count

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier entry points are imported on first use.
    if name == "Processor":
        from qwenvl_jax.processing.processor import Processor

        return Processor
    if name == "generate":
        from qwenvl_jax.inference.generate import generate

        return generate
    raise AttributeError(name)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "InputError",
    "ModelConfig",
    "Processor",
    "QwenVLError",
    "build_model",
    "from_pretrained",
    "generate",
    "load_config",
    "param_count",
]
