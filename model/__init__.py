"""The Kimi Linear model family: config + presets, KDA/GDN and MLA mixers, MoE, the hybrid model."""

from .config import ConfigError, ModelConfig, expand_pattern
from .presets import PRESETS, get_preset, with_pattern

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "expand_pattern", "get_preset", "with_pattern", "load_model"]


def load_model(checkpoint: str, step: int | None = None, device: str = "cpu"):
    """Load a training checkpoint into a single-process model in eval mode (see README)."""
    from train.checkpoint import load_model_for_inference

    return load_model_for_inference(checkpoint, step=step, device=device)
