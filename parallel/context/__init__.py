"""Context parallelism for KDA/GDN and MLA: the context object handed to the mixers and its modes.

See docs/parallelism.md. ``ContextParallel`` (layout.py) carries the group, rank, size, mode and the
document layout of this rank's slice; the mixers call its ``kda``, ``mla_keys`` and
``mla_attention``, which dispatch to ``kda_chunkwise`` / ``conv_halo`` / ``mla_latent`` (mode
``chunkwise``) or ``ulysses`` (mode ``ulysses``, DeepSpeed's all-to-all).
"""

from .layout import MODES, ContextParallel, ContextParallelError

__all__ = ["MODES", "ContextParallel", "ContextParallelError"]
