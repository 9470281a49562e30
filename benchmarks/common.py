"""Helpers shared by the benchmark scripts and the tests that compare with flash-linear-attention.

Benchmark scripts run as ``python benchmarks/NAME.py``: their own folder is then first on
``sys.path``, so they import this module as ``common`` (and each other by file name); the tests
import it as ``benchmarks.common`` (pytest puts the repository root on the path, pyproject.toml).
FLA is an oracle and a baseline here, never a dependency of the training code.
"""

from __future__ import annotations

import re

import torch

from kernels.kda import KDAOptions


def fla_backward_usable() -> bool:
    """FLA's gated-delta backward is miscompiled by Triton < 3.7.1 on Hopper (fla#640). FLA 0.6.0
    does not refuse it on Triton 3.6: on an H200 it hung for minutes and then left the CUDA context
    with an illegal-address error, so benchmarks and tests do not call it there."""
    import triton

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    return not (hopper and version < (3, 7, 1))


def add_kda_option_flags(parser, state_dtype: bool = True) -> None:
    """The command-line form of ``kernels.kda.KDAOptions`` (for experiments; see kda_options)."""
    defaults = KDAOptions()
    parser.add_argument("--launch", default="",
                        help="launch overrides of the KDA kernels, kernel[.few].option=int,... "
                             "(e.g. bwd_dh.few.BV=32,fwd_wy.num_warps=8; kernels/kda/options.py)")
    if state_dtype:
        parser.add_argument("--state-dtype", choices=["input", "float32"], default=defaults.state_dtype,
                            help="storage of the state passes' operands for bf16 inputs")
        parser.add_argument("--inverse-precision", choices=["ieee", "tf32x3", "tf32"],
                            default=defaults.inverse_precision,
                            help="dot precision of the diagonal-block inverse for 16-bit inputs")
    parser.add_argument("--cp-precision", choices=["ieee", "tf32x3", "tf32"], default=defaults.cp_precision,
                        help="dot precision of the context-parallel pre-pass kernels on GPUs")
    parser.add_argument("--diag-decay-clamp", type=float, default=defaults.diag_decay_clamp,
                        help="0: exact diagonal tiles (column loop where the decay is steep); c in (0, 8]: "
                             "tensor cores on every tile with per-token steps clamped at -c")


def kda_options(args) -> KDAOptions:
    """The ``KDAOptions`` of the flags of ``add_kda_option_flags``; a bad --launch item exits with its
    message."""
    defaults = KDAOptions()
    try:
        return KDAOptions(state_dtype=getattr(args, "state_dtype", defaults.state_dtype),
                          inverse_precision=getattr(args, "inverse_precision", defaults.inverse_precision),
                          cp_precision=args.cp_precision,
                          diag_decay_clamp=args.diag_decay_clamp).with_launch(args.launch)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
