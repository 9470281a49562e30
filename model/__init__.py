"""The Kimi Linear model family: config + presets, the mixer registry (KDA/GDN, MLA), MoE, the
hybrid model. Loading a training checkpoint is ``train.load_model`` (train/checkpoint.py)."""

from .config import ConfigError, ModelConfig, expand_pattern
from .presets import PRESETS, get_preset, with_pattern

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "expand_pattern", "get_preset", "with_pattern"]
