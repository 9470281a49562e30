"""The baseline of the training-throughput benchmark: transformers' ``KimiLinearForCausalLM``, set up
as a user would train it, in the configuration of one of our arms.

The model config is our HF export's (``model.hf_names.hf_config_from_model_config``), so the
baseline has the same layers and parameters as our arm; it trains in fp32 weights under bf16
autocast with fused AdamW (our recipe's betas, eps and weight decay) and gradient clipping at
1.0, on ``tokens_per_step // context`` random sequences of ``context`` tokens. transformers calls
flash-linear-attention's KDA kernels when ``fla`` imports (``kernels="fla"``), else its PyTorch
path; which one ran is not assumed but observed: the first (warm-up) step runs with a profile hook
that records every function of the ``fla`` package entered from outside it. docs/benchmarks.md,
"Training throughput".
"""

from __future__ import annotations

import importlib
import os
import sys
import time

MODELING = "transformers.models.kimi_linear.modeling_kimi_linear"
KERNELS = ("fla", "torch")  # transformers with FLA's kernels where they work here; its PyTorch path


def import_kimi_linear(use_fla: bool):
    """transformers' Kimi Linear modeling module. transformers binds FLA's kernels when the module is
    imported and ``fla`` imports; with ``use_fla=False`` that import is made to fail so it binds its
    PyTorch path (a module imported earlier in this process keeps what it bound)."""
    if use_fla or MODELING in sys.modules:
        return importlib.import_module(MODELING)
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "fla" or k.startswith("fla.")}
    sys.modules["fla"] = None  # makes ``import fla`` raise ImportError
    try:
        return importlib.import_module(MODELING)
    finally:
        del sys.modules["fla"]
        sys.modules.update(hidden)


def fla_status() -> tuple[bool, str]:
    """(whether FLA's kernels can run here, why not)."""
    try:
        import fla  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means transformers cannot use it either
        return False, f"fla does not import ({type(err).__name__}: {err})"
    try:
        from common import fla_backward_usable  # run as a script: benchmarks/ is first on sys.path
    except ImportError:
        from benchmarks.common import fla_backward_usable
    if not fla_backward_usable():
        import triton

        return False, (f"FLA's backward is miscompiled on this GPU by Triton {triton.__version__} (fla#640; needs "
                       ">= 3.7.1)")
    return True, ""


class FlaCalls:
    """Records the functions of the ``fla`` package entered from outside it while active (a
    ``sys.setprofile`` hook on this thread: the forward and the optimizer, not autograd's backward
    threads)."""

    def __init__(self):
        module = sys.modules.get("fla")
        self.root = os.path.dirname(module.__file__) + os.sep if getattr(module, "__file__", None) else None
        self.calls: set[str] = set()

    def _inside(self, frame) -> bool:
        return frame is not None and frame.f_code.co_filename.startswith(self.root)

    def _hook(self, frame, event, _arg):
        if event == "call" and self._inside(frame) and not self._inside(frame.f_back):
            self.calls.add(f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_name}")

    def __enter__(self) -> "FlaCalls":
        if self.root:
            sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.root:
            sys.setprofile(None)


def run_baseline(model_cfg, context: int, tokens_per_step: int, steps: int, device, bf16: bool = True,
                 kernels: str = "fla", recompute: bool = False, train=None) -> dict:
    """Time ``steps`` training steps (forward, backward, clipping, optimizer) of transformers'
    KimiLinearForCausalLM configured as ``model_cfg``; the first is warm-up (traced for FLA calls,
    not timed). ``train``: a TrainConfig for the optimizer settings (default: the defaults)."""
    import torch
    import transformers

    from model.hf_names import check_exportable, hf_config_from_model_config
    from train.config import TrainConfig

    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: use one of {KERNELS}")
    check_exportable(model_cfg)  # a layer transformers does not have (GDN) is refused by name
    train = train or TrainConfig()
    usable, why = fla_status() if kernels == "fla" else (False, "FLA hidden (--baseline hf-torch)")
    modeling = import_kimi_linear(usable)
    config = transformers.KimiLinearConfig(**hf_config_from_model_config(model_cfg, dtype="float32"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = modeling.KimiLinearForCausalLM(config).to(device).train()
    if recompute:
        model.gradient_checkpointing_enable()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                                  weight_decay=train.weight_decay, fused=True)
    micro = max(tokens_per_step // context, 1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (micro, context), generator=generator).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, train.clip_grad or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    times, losses = [], []
    with FlaCalls() as calls:
        losses.append(step())
    for _ in range(max(steps - 1, 1)):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    kda = "kda" in model_cfg.layer_types
    fla_used = bool(calls.calls)
    if fla_used:
        note = "FLA's kernels ran: " + ", ".join(sorted(calls.calls))
    elif not kda:
        note = "no KDA layer: FLA has nothing to run"
    elif usable:
        note = f"fla imports, but transformers {transformers.__version__} did not call it: its PyTorch path ran"
    else:
        note = f"transformers ran its PyTorch KDA path: {why}"
    row = dict(system="transformers", context=context, tokens_per_step=micro * context,
               tokens_per_s=micro * context / seconds, parameters=sum(p.numel() for p in model.parameters()),
               loss=losses[-1], losses=losses, recompute=recompute,
               kda_impl=("fla" if fla_used else "torch") if kda else None, fla_used=fla_used,
               fla_calls=sorted(calls.calls), kernels_note=note, transformers=transformers.__version__,
               attention=getattr(config, "_attn_implementation", None), bf16_autocast=bf16)
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row
