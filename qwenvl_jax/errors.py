"""The errors the library raises for bad input. The CLI turns any QwenVLError into one line on
stderr and exit status 2."""


class QwenVLError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class InputError(QwenVLError, ValueError):
    """A missing or unreadable image/video, a malformed message, a prompt that is too long."""


class ConfigError(QwenVLError, ValueError):
    """A missing, broken or unsupported config.json."""


class CheckpointError(QwenVLError):
    """A missing, truncated, corrupt or mismatched checkpoint."""
