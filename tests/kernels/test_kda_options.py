"""KDAOptions (kernels/kda/options.py): checks, the command-line form of launch overrides, the record
a run writes, and that every option reaches the kernel launches it is for (recorded by wrapping the
kernels of kernels/kda/chunk.py; the Triton interpreter on CPU)."""
import json

import pytest
import torch

from kernels.kda import KDAOptions
from kernels.kda import chunk as chunk_module
from kernels.kda import cp_prepass
from kernels.kda.options import DEFAULT_LAUNCH
from tests.helpers.kda import make_inputs, on_device, run_with_grads


class _LaunchSpy:
    """Stands in for a Triton kernel in chunk.py: records each launch's grid, arguments and keyword
    arguments, then launches the real kernel."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _run_recording(monkeypatch, options, dtype=torch.float32, Dk=16, Dv=16) -> dict:
    """One forward + backward of chunk_kda_triton (raw gate, two documents) with ``options``; returns
    {kernel name: [(grid, args, kwargs), ...]}."""
    calls = {}
    for name in dir(chunk_module):
        if name.startswith("kda_") and name.endswith("_kernel"):
            short = name[len("kda_"):-len("_kernel")]
            calls[short] = []
            monkeypatch.setattr(chunk_module, name, _LaunchSpy(getattr(chunk_module, name), calls[short]))
    inputs = on_device(make_inputs(1, 80, 2, Dk, Dv, gate_kind="softplus", n_docs=2), "cpu", dtype)
    cu = torch.tensor([0, 70, 80], dtype=torch.int32)
    run_with_grads(lambda *a, **k: chunk_module.chunk_kda_triton(*a, options=options, **k), inputs, cu)
    return calls


def test_launch_overrides_from_the_command_line_form():
    """with_launch changes the named values of the regular and the "few" launch of a kernel and leaves
    the rest (of the entry and of the other kernels) alone; DEFAULT_LAUNCH is never edited; a
    malformed item names itself and the expected form."""
    before = json.dumps(DEFAULT_LAUNCH, sort_keys=True)
    few_bv = DEFAULT_LAUNCH["bwd_dh"]["few"]["BV"]
    options = KDAOptions().with_launch(f"bwd_dh.few.BV={2 * few_bv}, fwd_wy.num_warps=8")
    assert options.launch_entry("bwd_dh")["few"] == dict(DEFAULT_LAUNCH["bwd_dh"]["few"], BV=2 * few_bv)
    assert options.launch_entry("bwd_dh")["BV"] == DEFAULT_LAUNCH["bwd_dh"]["BV"]
    assert options.launch_entry("fwd_wy") == dict(DEFAULT_LAUNCH["fwd_wy"], num_warps=8)
    assert set(options.launch) == {"bwd_dh", "fwd_wy"}
    assert all(options.launch_entry(n) == DEFAULT_LAUNCH[n] for n in DEFAULT_LAUNCH if n not in options.launch)
    # a second override builds on the first
    assert options.with_launch("fwd_wy.num_stages=3").launch_entry("fwd_wy") == dict(
        DEFAULT_LAUNCH["fwd_wy"], num_warps=8, num_stages=3)
    assert json.dumps(DEFAULT_LAUNCH, sort_keys=True) == before
    for bad in ("bwd_dh.BV", "nokernel.num_warps=2", "bwd_dh.more.BV=2", "fwd_wy.num_warps=x"):
        with pytest.raises(ValueError, match=r"--launch item .*kernel\[.few\].option=int"):
            KDAOptions().with_launch(bad)


@pytest.mark.parametrize("field,value,message", [
    ("state_dtype", "bf16", r"state_dtype='bf16': expected one of 'input', 'float32'"),
    ("inverse_precision", "fp64", r"inverse_precision='fp64'"),
    ("cp_precision", "tf16", r"cp_precision='tf16'"),
    ("diag_span_max", 200.0, r"diag_span_max=200.0: expected a number in \[0, 80\]"),
    ("diag_decay_clamp", 9.0, r"diag_decay_clamp=9.0: expected 0 \(exact diagonal tiles\) or a number in \(0, 8\]"),
    ("launch", {"fwd_x": {"num_warps": 2}}, r"unknown kernel 'fwd_x'"),
    ("launch", {"fwd_h": {"warps": 2, "num_warps": 2, "num_stages": 1, "BV": 32}},
     r"launch\['fwd_h'\]: unknown option 'warps'"),
    ("launch", {"fwd_h": {"num_warps": 2, "num_stages": 1}}, r"launch\['fwd_h'\]: missing BV"),
    ("launch", {"bwd_dh": dict(DEFAULT_LAUNCH["bwd_dh"], few={"num_warps": 2})},
     r"launch\['bwd_dh'\]\[few\]: missing num_stages, BV"),
    ("launch", {"fwd_o": {"num_warps": 0, "num_stages": 1}},
     r"launch\['fwd_o'\]\['num_warps'\]=0: expected a positive int"),
    ("launch", {"bwd_dh": dict(DEFAULT_LAUNCH["bwd_dh"], split_k=4)},
     r"launch\['bwd_dh'\]\['split_k'\]=4: only bwd_dh takes it, as 1 or 2"),
    ("launch", {"fwd_o": {"num_warps": 4, "num_stages": 1, "split_k": 2}}, r"\['fwd_o'\]\['split_k'\]=2: only bwd_dh"),
])
def test_bad_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        KDAOptions(**{field: value})


def test_the_record_is_json_and_reads_back():
    options = KDAOptions(state_dtype="float32", diag_span_max=0, diag_decay_clamp=6.0,
                         cp_precision="ieee").with_launch("fwd_o.num_warps=8")
    record = json.loads(json.dumps(options.to_dict()))
    assert record["state_dtype"] == "float32"
    assert record["launch"] == {"fwd_o": dict(DEFAULT_LAUNCH["fwd_o"], num_warps=8)}
    assert KDAOptions.from_dict(record) == options
    assert KDAOptions().to_dict()["launch"] == {}


def test_launch_entry_gives_warps_stages_and_register_cap():
    """_cfg passes num_warps / num_stages and the register cap (maxnreg) of a launch entry, not its
    block sizes; head sizes over 128 fall back to one stage (pipelined launches measured at <= 128)."""
    entry = dict(num_warps=2, num_stages=2, BD=32, maxnreg=160)
    assert chunk_module._cfg("bwd_intra", entry, 128) == dict(num_warps=2, num_stages=2, maxnreg=160)
    assert chunk_module._cfg("bwd_intra", entry, 256) == dict(num_warps=2, num_stages=1, maxnreg=160)


def test_default_options_reach_the_kernels(monkeypatch):
    calls = _run_recording(monkeypatch, None)
    assert calls["fwd_wy"][0][2]["num_warps"] == DEFAULT_LAUNCH["fwd_wy"]["num_warps"]
    assert calls["fwd_wy"][0][2]["maxnreg"] == DEFAULT_LAUNCH["fwd_wy"]["maxnreg"]
    assert calls["fwd_intra"][0][2]["SPAN"] == calls["bwd_intra"][0][2]["SPAN"] == 60.0
    assert calls["fwd_intra"][0][2]["CLAMP"] == calls["bwd_intra"][0][2]["CLAMP"] == 0.0
    # two documents x two heads: few programs, so the state passes take their "few" launch
    assert calls["fwd_h"][0][2]["BV"] == DEFAULT_LAUNCH["fwd_h"]["few"]["BV"]


# the clamped tiles' entries above the diagonal (discarded) overflow: numpy warns in the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in matmul", "ignore:invalid value encountered in matmul")
def test_launch_and_span_options_reach_the_kernels(monkeypatch):
    """A launch override changes exactly the launch it names (the regular state-pass entry, without a
    "few" one, is taken even for few programs); diag_span_max and diag_decay_clamp reach both intra
    kernels."""
    options = KDAOptions(diag_span_max=0.0, diag_decay_clamp=7.5, launch={"fwd_h": dict(num_warps=2, num_stages=1, BV=32)}).with_launch(
        "fwd_wy.num_warps=8,fwd_wy.maxnreg=96,bwd_intra.BD=16")
    calls = _run_recording(monkeypatch, options, Dk=32, Dv=32)   # default: BV 16 ("few"), BD 32
    assert {k: calls["fwd_wy"][0][2][k] for k in ("num_warps", "num_stages", "maxnreg")} == dict(
        num_warps=8, num_stages=DEFAULT_LAUNCH["fwd_wy"]["num_stages"], maxnreg=96)
    grid, _, kwargs = calls["fwd_h"][0]
    assert kwargs["BV"] == 32 and kwargs["num_warps"] == 2 and kwargs["num_stages"] == 1 and grid[0] == 1
    bwd_intra = calls["bwd_intra"][0]
    assert bwd_intra[2]["BD"] == 16 and bwd_intra[0][0] == 3 * 2  # 3 chunks x 2 Dk slices of 16
    assert calls["fwd_intra"][0][2]["SPAN"] == bwd_intra[2]["SPAN"] == 0.0
    assert calls["fwd_intra"][0][2]["CLAMP"] == bwd_intra[2]["CLAMP"] == 7.5
    assert calls["bwd_dh"][0][2]["num_warps"] == DEFAULT_LAUNCH["bwd_dh"]["few"]["num_warps"]  # untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_state_dtype_and_inverse_precision_reach_the_kernels(monkeypatch, dtype):
    """bf16 inputs store W, kg and the per-chunk states (and their gradients) in bf16 unless
    state_dtype is "float32"; fp32 inputs always fp32. inverse_precision reaches the WY kernel for
    16-bit inputs only. (bf16 dots are not exact in the interpreter: only dtypes and arguments are
    checked here; the GPU tests check the values.)"""
    for options, expect in ((KDAOptions(inverse_precision="tf32x3"), dtype),
                            (KDAOptions(state_dtype="float32", inverse_precision="tf32x3"), torch.float32)):
        calls = _run_recording(monkeypatch, options, dtype=dtype)
        _, args, _ = calls["fwd_h"][0]
        W, h = args[2], args[5]
        dh = calls["bwd_dh"][0][1][7]
        assert W.dtype == h.dtype == dh.dtype == expect
        assert calls["fwd_wy"][0][2]["INV_PREC"] == ("tf32x3" if dtype == torch.bfloat16 else "ieee")
        monkeypatch.undo()


def test_cp_precision_reaches_the_prepasses():
    cuda = torch.device("cuda")
    assert cp_prepass._prec(cuda, KDAOptions(cp_precision="tf32x3"), "tf32") == "tf32x3"
    assert cp_prepass._prec(cuda, None, "tf32") == KDAOptions().cp_precision == "tf32"
    # exact dots where the op itself takes them (fp32 inputs), and in the interpreter
    assert cp_prepass._prec(cuda, KDAOptions(cp_precision="tf32"), "ieee") == "ieee"
    assert cp_prepass._prec(torch.device("cpu"), KDAOptions(cp_precision="tf32"), "tf32") == "ieee"


def test_prepass_launch_options_reach_the_prepasses(monkeypatch):
    """The pre-pass kernels take their column block and warps from KDAOptions.launch: BV sets the
    grid's column blocks ((K + V) / BV for the transition, V / BV for the entry gradient)."""
    calls = {}
    for name in ("kda_cp_transition_kernel", "kda_cp_entry_grad_kernel"):
        calls[name] = []
        monkeypatch.setattr(cp_prepass, name, _LaunchSpy(getattr(cp_prepass, name), calls[name]))
    options = KDAOptions().with_launch("cp_transition.BV=16,cp_transition.num_stages=2,cp_entry_grad.BV=8")
    for opts, (bv_t, bv_e, stages) in ((None, (32, 32, 1)), (options, (16, 8, 2))):
        for spy in calls.values():
            spy.clear()
        _run_prepasses(opts)
        (grid_t, _, kw_t), = calls["kda_cp_transition_kernel"]
        (grid_e, _, kw_e), = calls["kda_cp_entry_grad_kernel"]
        assert (kw_t["BV"], kw_e["BV"], kw_t["num_stages"]) == (bv_t, bv_e, stages)
        assert grid_t[0] == (16 + 16) // bv_t and grid_e[0] == -(-16 // bv_e)


def _run_prepasses(options):
    """One forward + backward of chunk_kda_triton with a state hook that runs both pre-passes on
    the forward's and the backward's pieces (K = V = 16, one document)."""
    class Hook:
        def initial_state(self, pieces, cu, offsets, opts):
            cp_prepass.transition_pairs(pieces, cu, offsets, [0], [1], options)
            W = pieces["W"]
            return W.new_zeros(1, W.shape[1], W.shape[3], pieces["U"].shape[3], dtype=torch.float32)

        def final_state_gradient(self, pieces, do, cu, offsets, opts):
            cp_prepass.entry_state_gradients(pieces, do, cu, offsets, [0], options)
            return None

    inputs = on_device(make_inputs(1, 80, 2, 16, 16, gate_kind="softplus", h0=False), "cpu", torch.float32)
    run_with_grads(lambda *a, **k: chunk_module.chunk_kda_triton(*a, state_hook=Hook(), **k), inputs,
                   torch.tensor([0, 80], dtype=torch.int32))
