"""What autograd keeps for a backward, counted by storage (a tensor and its views count once)."""

import torch


def saved_storages(fn, *args):
    """Run ``fn(*args)``; returns its output and ``[(bytes, element size)]`` of every storage that
    autograd saved for the backward while it ran."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, list(storages.values())
