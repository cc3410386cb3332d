"""streamconv: convert sharded safetensors checkpoints by planning from headers, copying bytes."""

from __future__ import annotations

__version__ = "0.1.0"

from .convert import ConvertOptions, ConvertResult, convert
from .errors import StreamconvError
from .rules import HYV3, PRESETS, RuleSet

__all__ = [
    "HYV3",
    "PRESETS",
    "ConvertOptions",
    "ConvertResult",
    "RuleSet",
    "StreamconvError",
    "__version__",
    "convert",
]
