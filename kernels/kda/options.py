"""How the Triton KDA kernels run: ``KDAOptions``, passed to ``chunk_kda`` (defaults here, in code).

Nothing in ``kernels/kda`` reads the environment: a run, a test or a benchmark that wants other
options builds a ``KDAOptions`` and passes it (``chunk_kda(..., options=...)``; the model's layers
hold theirs as ``KimiDeltaAttention.kernel_options``). ``to_dict()`` is what a training run records
in its checkpoints' meta.json and its first metrics record. The PyTorch paths (CPU tensors) have
no such knobs and ignore the options. docs/kda_kernels.md describes each option.

``CHUNK_SIZE`` is not an option: the chunk length every KDA implementation here (references,
Triton kernels, FLOP counts) uses; the Triton kernels' tiling is written for it (4 blocks of 16).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from kernels.chunking import CHUNK_SIZE  # noqa: F401 (re-exported: the one definition)

STATE_DTYPES = ("input", "float32")
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")

# Launch options per kernel (K = V = 128, bf16 on an H200): num_warps / num_stages / the register
# cap maxnreg, and the V-block (BV) of the state passes / Dk slice (BD) of the backward intra
# kernel; other head sizes use the same values (Dk > 128 falls back to shared-memory-safe ones).
# The sequential state passes run one program per (sequence, head, V-block); an entry's "few" is
# the launch used when the regular one would leave SMs idle (few sequences x heads, 1x32768).
# Swept with benchmarks/kda_tune.py (docs/kda_kernels.md, "Launch options"): shared memory must
# stay under Hopper's 227 KiB, which rules out two stages for the backward state pass on fp32 states.
DEFAULT_LAUNCH = {
    "fwd_cumsum": dict(num_warps=4, num_stages=1),
    # two stages pipeline the loads of the column-block loops (the kernel waits on memory)
    "fwd_intra": dict(num_warps=2, num_stages=2),
    # a register cap (spills ~100 B) lets a third program share an SM
    "fwd_wy": dict(num_warps=4, num_stages=1, maxnreg=128),
    "fwd_h": dict(num_warps=4, num_stages=2, BV=64, few=dict(num_warps=2, num_stages=2, BV=16)),
    "fwd_o": dict(num_warps=4, num_stages=2),
    # bf16 states: 4 or 8 warps (wgmma) end in an illegal memory access at the dot (q e^G)^T dO
    # on the H200 with Triton 3.6 (located by compute-sanitizer) and 3.7.1; 2 warps (mma.sync) are correct
    "bwd_dh": dict(num_warps=2, num_stages=1, BV=32, few=dict(num_warps=2, num_stages=2, BV=16)),
    "bwd_chunk_dk": dict(num_warps=4, num_stages=2),
    "bwd_chunk_wy": dict(num_warps=4, num_stages=1, maxnreg=168),
    "bwd_intra": dict(num_warps=2, num_stages=2, BD=32),
    "gate_bwd": dict(num_warps=8, num_stages=1),   # not swept: an elementwise pass
    # the context-parallel pre-passes (kernels/kda/cp_prepass.py): BV is their column block
    "cp_transition": dict(num_warps=4, num_stages=1, BV=32),
    "cp_entry_grad": dict(num_warps=4, num_stages=1, BV=32),
}
LAUNCH_KEYS = ("num_warps", "num_stages", "maxnreg", "BV", "BD", "split_k", "few")
# split_k (bwd_dh only, Dk = 128): 2 runs the state gradient as two Dk halves (kda_bwd_dh_split_kernel)
SPLIT_K_KERNELS = ("bwd_dh",)
# what every entry of a kernel must give (its "few" entry too)
_BLOCK_KEY = {"fwd_h": "BV", "bwd_dh": "BV", "bwd_intra": "BD", "cp_transition": "BV", "cp_entry_grad": "BV"}


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"KDAOptions.{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _check_launch_entry(kernel: str, entry, nested: bool = False) -> None:
    if kernel not in DEFAULT_LAUNCH:
        raise ValueError(f"KDAOptions.launch: unknown kernel {kernel!r}; kernels: {', '.join(DEFAULT_LAUNCH)}")
    if not isinstance(entry, dict):
        raise ValueError(f"KDAOptions.launch[{kernel!r}]: expected a dict of launch options, got {entry!r}")
    required = ("num_warps", "num_stages") + ((_BLOCK_KEY[kernel],) if kernel in _BLOCK_KEY else ())
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"KDAOptions.launch[{kernel!r}]{'[few]' if nested else ''}: missing {', '.join(missing)} "
                         f"(an entry replaces the default {DEFAULT_LAUNCH[kernel]} as a whole)")
    for key, value in entry.items():
        if key not in LAUNCH_KEYS or (nested and key == "few"):
            raise ValueError(f"KDAOptions.launch[{kernel!r}]: unknown option {key!r}; options: "
                             f"{', '.join(LAUNCH_KEYS)}")
        if key == "few":
            if value is not None:
                _check_launch_entry(kernel, value, nested=True)
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"KDAOptions.launch[{kernel!r}][{key!r}]={value!r}: expected a positive int")
        elif key == "split_k" and (kernel not in SPLIT_K_KERNELS or value not in (1, 2)):
            raise ValueError(f"KDAOptions.launch[{kernel!r}]['split_k']={value!r}: only "
                             f"{', '.join(SPLIT_K_KERNELS)} takes it, as 1 or 2")


@dataclass(frozen=True)
class KDAOptions:
    """Options of the Triton KDA kernels (``chunk_kda``, ``chunk_kda_triton`` and the context-parallel
    pre-passes). The defaults are what training uses and what the tests and benchmarks measure.

    state_dtype: "input": bf16 inputs store what feeds the state passes' dots (W, q e^G, k e^(G_last-G),
        the per-chunk states and their gradients) in bf16 and take bf16 tensor-core dots there (fp32
        accumulation and running state); "float32" keeps them fp32. fp16 and fp32 inputs are always fp32.
    inverse_precision: dot precision of the diagonal-block inverse for 16-bit inputs ("ieee" tested;
        "tf32x3", "tf32"); fp32 inputs always take "ieee".
    diag_span_max: the diagonal 16x16 tiles of the intra-chunk products take tensor-core dots when
        the log-decay over their 16 rows (per Dk slice) is at most this, else an exact per-column loop
        (0 forces the loop everywhere; above ~80 exponentials can overflow fp32).
    diag_decay_clamp: 0 (default) keeps the diagonal tiles exact as above. A value c in (0, 8]
        makes every diagonal tile take the tensor-core dots (no column loop): inside the tile each
        token's log-decay step is clamped at -c and the tile's midpoint is the reference, so the
        exponents stay within [-7.5 c, 7.5 c] (the same fp32 headroom as diag_span_max = 60 at
        c = 8). A product exp(G_r - G_c) is unchanged unless a step between c and r decays by more
        than c; then it and its replacement are both below e^-c (an absolute error < e^-c per
        channel and term; docs/kda_kernels.md, "Diagonal tiles").
    launch: per-kernel launch entries that replace ``DEFAULT_LAUNCH``'s (kernel name -> dict of
        num_warps, num_stages, maxnreg, BV, BD, few); ``with_launch`` builds them from a string.
    cp_precision: dot precision of the context-parallel pre-pass kernels on GPUs ("tf32" default:
        one tensor-core pass, error ~1e-4 against fp32 dots on the H200, a tenth of the local bf16
        op's; "tf32x3" ~fp32 at twice the cost; the interpreter always runs "ieee").
    """

    state_dtype: str = "input"
    inverse_precision: str = "ieee"
    diag_span_max: float = 60.0
    diag_decay_clamp: float = 0.0
    launch: dict = field(default_factory=dict)
    cp_precision: str = "tf32"

    def __post_init__(self):
        _check_choice("state_dtype", self.state_dtype, STATE_DTYPES)
        _check_choice("inverse_precision", self.inverse_precision, DOT_PRECISIONS)
        _check_choice("cp_precision", self.cp_precision, DOT_PRECISIONS)
        if not isinstance(self.diag_span_max, (int, float)) or not 0 <= self.diag_span_max <= 80:
            raise ValueError(f"KDAOptions.diag_span_max={self.diag_span_max!r}: expected a number in [0, 80]")
        clamp = self.diag_decay_clamp
        if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or not 0 <= clamp <= 8:
            raise ValueError(f"KDAOptions.diag_decay_clamp={clamp!r}: expected 0 (exact diagonal tiles) or a "
                             "number in (0, 8] (larger would let the tile's exponentials overflow fp32)")
        if not isinstance(self.launch, dict):
            raise ValueError(f"KDAOptions.launch: expected a dict kernel -> launch options, got {self.launch!r}")
        for kernel, entry in self.launch.items():
            _check_launch_entry(kernel, entry)
        object.__setattr__(self, "launch", copy.deepcopy(self.launch))   # callers' dicts stay theirs

    def launch_entry(self, kernel: str) -> dict:
        """The launch options of ``kernel`` (this object's entry, else the default)."""
        return self.launch.get(kernel) or DEFAULT_LAUNCH[kernel]

    def with_launch(self, spec: str) -> KDAOptions:
        """These options with the launch overrides of ``spec`` (command-line form, for experiments):
        comma-separated ``kernel[.few].option=int`` items, e.g. ``"bwd_dh.few.BV=32,fwd_wy.num_warps=8"``;
        each item changes one value of the kernel's current entry and keeps the rest."""
        launch = copy.deepcopy(self.launch)
        for item in filter(None, (part.strip() for part in spec.split(","))):
            path, _, value = item.partition("=")
            kernel, *middle, option = path.split(".")
            if kernel not in DEFAULT_LAUNCH or middle not in ([], ["few"]) or not value.isdigit():
                raise ValueError(f"--launch item {item!r}: expected kernel[.few].option=int, kernels "
                                 f"{', '.join(DEFAULT_LAUNCH)}")
            entry = launch.setdefault(kernel, copy.deepcopy(DEFAULT_LAUNCH[kernel]))
            if middle:   # the kernel's launch for few programs
                if entry.get("few") is None:
                    entry["few"] = {}
                entry = entry["few"]
            entry[option] = int(value)
        return dataclasses.replace(self, launch=launch)

    def to_dict(self) -> dict:
        """JSON-ready record of these options (``launch``: the overridden kernels only; the others run
        ``DEFAULT_LAUNCH`` of the code version)."""
        return dict(state_dtype=self.state_dtype, inverse_precision=self.inverse_precision,
                    diag_span_max=float(self.diag_span_max), diag_decay_clamp=float(self.diag_decay_clamp),
                    cp_precision=self.cp_precision,
                    launch=copy.deepcopy(self.launch))

    @classmethod
    def from_dict(cls, record: dict) -> KDAOptions:
        """The options ``to_dict`` recorded."""
        return cls(**record)
