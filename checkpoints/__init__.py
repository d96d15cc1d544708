"""What a saved model is: the architecture config and presets, the GPT module, quantized tensors,
our ``model.bin`` format and the import of the challenge's ``.ptz`` artifacts."""

from .config import PRESETS, ConfigError, ModelConfig, preset, resolve_config
from .model import GPT, apply_precision, autocast

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset", "resolve_config", "GPT", "apply_precision", "autocast"]
