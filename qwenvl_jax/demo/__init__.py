"""The embedded default: `qwenvl-jax demo` trains a small Qwen-VL on synthetic shapes end to end."""
