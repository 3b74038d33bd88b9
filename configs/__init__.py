"""Model presets (models/), training stage configs (train/) and demo configs (demo/).

The repository's configs/ folder is installed as the package `qwenvl_jax.configs` (see
pyproject.toml), so a wheel carries these files and the code reads them through
`qwenvl_jax.resources.config_dir` wherever the package is installed.
"""
