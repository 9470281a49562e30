"""Custom kernels (Triton) with pure-PyTorch references."""
