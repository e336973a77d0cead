"""Error types shared by both sides (torch-free), so the CLI can report them without importing torch."""
from .config import ConfigError
from .manifest import EngineError


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file or key and the fix."""


__all__ = ["CheckpointError", "ConfigError", "EngineError"]
