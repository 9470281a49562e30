"""Small fixes for running the KDA kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).

Applied at import time only when the interpreter is on; a no-op on GPUs.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
