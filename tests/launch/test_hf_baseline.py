"""The transformers baseline of benchmarks/train_throughput.py (benchmarks/hf_baseline.py): it trains
transformers' KimiLinearForCausalLM in the configuration of our arm (the same parameters as our
model), steps with finite losses, refuses arms transformers does not have, and reports FLA's kernels
as used only when functions of the ``fla`` package were really entered."""

import math
import sys

import pytest
import torch

from benchmarks.hf_baseline import FlaCalls, run_baseline
from model.presets import as_arm, get_preset


def _tiny(arm):
    return as_arm(get_preset("tiny"), arm).replace(vocab_size=512)


@pytest.mark.parametrize("arm", ["mla", "kimi-linear"])
def test_baseline_trains_our_arms_configuration(arm):
    from model.model import build_model
    from parallel import state

    row = run_baseline(_tiny(arm), context=32, tokens_per_step=64, steps=2, device=torch.device("cpu"), bf16=False)
    assert row["tokens_per_step"] == 64 and row["tokens_per_s"] > 0
    assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
    assert row["losses"][0] == pytest.approx(math.log(512), rel=0.1)  # random ids, a fresh model
    state.initialize(state.ParallelDims())
    try:  # the same layers and widths as our model of that arm (the HF export's config)
        assert row["parameters"] == sum(p.numel() for p in build_model(_tiny(arm)).parameters())
    finally:
        state.destroy()
    if "fla" not in sys.modules:  # this machine: no flash-linear-attention, so transformers' PyTorch path
        assert row["fla_used"] is False and row["fla_calls"] == []
        if arm == "kimi-linear":
            assert row["kda_impl"] == "torch" and row["kernels_note"].startswith(
                "transformers ran its PyTorch KDA path: fla does not import")
        else:
            assert row["kda_impl"] is None and row["kernels_note"] == "no KDA layer: FLA has nothing to run"


def test_baseline_refuses_an_arm_transformers_does_not_have():
    from model.hf_names import HFConversionError

    with pytest.raises(HFConversionError, match="Gated DeltaNet"):
        run_baseline(_tiny("gdn-h"), context=32, tokens_per_step=64, steps=2, device=torch.device("cpu"))


def test_fla_calls_are_the_package_functions_entered_from_outside(tmp_path, monkeypatch):
    package = tmp_path / "fla"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text(
        "def helper(x):\n    return x + 1\n\n\ndef chunk_kda(x):\n    return helper(x) * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k == "fla" or k.startswith("fla.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    try:
        import fla.ops

        with FlaCalls() as calls:
            assert fla.ops.chunk_kda(1) == 4
        assert fla.ops.chunk_kda(1) == 4  # after the block: not recorded
        assert calls.calls == {"fla.ops.chunk_kda"}  # helper was entered from inside the package
        with FlaCalls() as idle:
            torch.ones(2).sum()
        assert idle.calls == set()
    finally:
        for name in [k for k in sys.modules if k == "fla" or k.startswith("fla.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_baseline_runs_flas_kernels_on_the_gpu():
    from benchmarks.hf_baseline import fla_status

    usable, why = fla_status()
    if not usable:
        pytest.skip(why)
    row = run_baseline(_tiny("kimi-linear"), context=256, tokens_per_step=512, steps=2, device=torch.device("cuda"))
    assert row["fla_used"] and any("kda" in name for name in row["fla_calls"]), row["kernels_note"]
    assert all(math.isfinite(x) for x in row["losses"])
