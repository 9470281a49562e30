"""The chunk length of every chunked KDA implementation here (references, Triton kernels, context
parallelism) and of the FLOP and memory formulas that count them. Standard library only, so that
model configs and the mixer registry can read it without importing torch or Triton."""

CHUNK_SIZE = 64
