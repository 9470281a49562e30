"""Training: the loop, optimizers, schedules, checkpoints, metrics and FLOPs."""


def load_model(checkpoint: str, step: int | None = None, device: str = "cpu"):
    """Load a training checkpoint (any saved parallel layout) into a single-process model in eval
    mode (see README)."""
    from train.checkpoint import load_model_for_inference

    return load_model_for_inference(checkpoint, step=step, device=device)
