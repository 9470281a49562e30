"""Training metrics: MoE load balance, KDA gate statistics, peak memory, and the metrics writers
(one JSON object per step in ``metrics.jsonl``; Weights & Biases, offline unless configured).

All functions that reduce across ranks must be called by every rank of the group at the same step.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.kda.gate import kda_log_decay


def _layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else -1


def _group(kind: str):
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    if kind == "tp_dp":
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_tensor_model_parallel_group()


def _world(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


# ----------------------------------------------------------------------------- MoE load balance
def tokens_per_expert(model, group="auto") -> dict[int, torch.Tensor]:
    """Tokens routed to each expert in this step, per MoE layer (float64 copies).

    Reads megatron's router counters ``local_tokens_per_expert`` (accumulated over the step's
    micro-batches); call it BEFORE the expert-bias update, which resets them. The counts are summed
    over the tensor x data (x context) parallel group (``group="auto"``; ``None``: this rank only).
    Under TP without sequence parallelism every TP rank routes the same tokens, so the sums are TP
    times the token count; the balance ratios are unaffected.
    """
    names, counts = [], []
    for name, module in model.named_modules():
        local = getattr(module, "local_tokens_per_expert", None)
        if torch.is_tensor(local) and hasattr(module, "expert_bias"):
            names.append(_layer_index(name))
            counts.append(local.detach().double().clone())
    if not counts:
        return {}
    stacked = torch.stack(counts)
    if group == "auto":
        group = _group("tp_dp")
    if _world(group) > 1:
        dist.all_reduce(stacked, group=group)
    return {layer: row.cpu() for layer, row in zip(names, stacked)}


def moe_load_metrics(model, group="auto") -> dict[str, float]:
    """Per MoE layer: max/mean and min/mean of the tokens per expert (1.0 = perfect balance),
    plus the worst max/mean over layers."""
    out: dict[str, float] = {}
    worst = 0.0
    for layer, counts in tokens_per_expert(model, group).items():
        mean = float(counts.mean())
        if mean <= 0:
            continue
        out[f"moe/layer{layer}/max_over_mean"] = float(counts.max()) / mean
        out[f"moe/layer{layer}/min_over_mean"] = float(counts.min()) / mean
        worst = max(worst, out[f"moe/layer{layer}/max_over_mean"])
    if out:
        out["moe/max_over_mean"] = worst
    return out


# ----------------------------------------------------------------------------- KDA gates
def _kda_layers(model) -> list:
    """(metric prefix ``<kind>/layer<i>``, mixer) of every layer whose mixer has KDA's forget gate
    (``gate_statistics`` in model/mixers.py: KDA and GDN)."""
    from model import mixers
    from model.model import DecoderLayer

    return [(f"{layer.layer_type}/layer{layer.layer_idx}", layer.mixer) for layer in model.modules()
            if isinstance(layer, DecoderLayer) and mixers.of_kind(layer.layer_type).gate_statistics]


def log_decay(raw: torch.Tensor, module) -> torch.Tensor:
    """Per-channel (KDA) or per-head (GDN) log-decay g <= 0 [T, heads, channels] from the raw gate
    projection ``raw`` [T, local decay width] (zeros: the decay at zero input); the gate of
    kernels/kda/gate.py (docs/architecture.md, "The forget gate")."""
    heads = module.A_log.numel()
    x = raw.reshape(1, raw.shape[0], heads, -1)   # per-channel layout; GDN: one channel per head
    return kda_log_decay(x, (module.A_log, module.dt_bias, module.lower_bound))[0]


def _reduce_mean_min(sums: torch.Tensor, counts: torch.Tensor, mins: torch.Tensor, group):
    if _world(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
    return sums / counts.clamp_min(1), mins


@torch.no_grad()
def kda_decay_at_zero_input(model, group="auto") -> dict[str, float]:
    """Cheap, parameter-only gate statistics: mean/min log-decay at zero input per KDA/GDN layer
    (min = the fastest-forgetting channel), reduced over the TP group (heads are TP-split)."""
    layers = _kda_layers(model)
    if not layers:
        return {}
    if group == "auto":
        group = _group("tp")
    sums, counts, mins = [], [], []
    for _, module in layers:
        g = log_decay(torch.zeros(1, module.dt_bias.numel(), device=module.dt_bias.device), module)
        sums.append(g.sum().double())
        counts.append(torch.tensor(float(g.numel()), dtype=torch.float64, device=g.device))
        mins.append(g.min().double())
    mean, low = _reduce_mean_min(torch.stack(sums), torch.stack(counts), torch.stack(mins), group)
    out = {}
    for (prefix, _), m, lo in zip(layers, mean.tolist(), low.tolist()):
        out[f"{prefix}/log_decay0_mean"] = m
        out[f"{prefix}/log_decay0_min"] = lo
    return out


class GateMonitor:
    """Activation statistics of the KDA/GDN gates over the forwards between ``arm()`` and
    ``collect()``: per layer the mean and min log-decay of the actual gate (A_log, dt_bias and the
    batch's raw forget-gate projection) and the mean beta. Forward hooks exist only while armed, so
    arm it on the steps you log (every K steps)."""

    def __init__(self, model):
        self.layers = _kda_layers(model)
        self.handles: list = []
        self.stats: dict[int, list[torch.Tensor]] = {}

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self) -> None:
        if self.armed:
            return
        self.stats = {}
        for slot, (_, module) in enumerate(self.layers):
            # [sum g, count g, min g, sum beta, count beta]
            self.stats[slot] = [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                                torch.tensor(math.inf, dtype=torch.float64),
                                torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
            self.handles.append(module.f_b_proj.register_forward_hook(self._gate_hook(slot, module)))
            self.handles.append(module.b_proj.register_forward_hook(self._beta_hook(slot)))

    def _gate_hook(self, slot, module):
        def hook(_, __, output):
            if not module.training:
                return
            raw = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                g = log_decay(raw.detach().reshape(-1, raw.shape[-1]), module)
                s = self.stats[slot]
                s[0] += g.sum().double().cpu()
                s[1] += g.numel()
                s[2] = torch.minimum(s[2], g.min().double().cpu())
        return hook

    def _beta_hook(self, slot):
        def hook(module, __, output):
            if not module.training:
                return
            raw = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                s = self.stats[slot]
                s[3] += torch.sigmoid(raw.detach().float()).sum().double().cpu()
                s[4] += raw.numel()
        return hook

    def collect(self, group="auto") -> dict[str, float]:
        """Remove the hooks and return the statistics (reduced over the TP group)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if not self.layers or not self.stats:
            return {}
        if group == "auto":
            group = _group("tp")
        rows = torch.stack([torch.stack(self.stats[i]) for i in range(len(self.layers))])  # [L, 5]
        device = "cuda" if torch.cuda.is_available() and _world(group) > 1 else "cpu"
        rows = rows.to(device)
        g_mean, g_min = _reduce_mean_min(rows[:, 0].clone(), rows[:, 1].clone(), rows[:, 2].clone(), group)
        b_sum, b_count = rows[:, 3].clone(), rows[:, 4].clone()
        if _world(group) > 1:
            dist.all_reduce(b_sum, group=group)
            dist.all_reduce(b_count, group=group)
        b_mean = b_sum / b_count.clamp_min(1)
        out = {}
        for i, (p, _) in enumerate(self.layers):
            if rows[i, 1] == 0:
                continue
            out[f"{p}/log_decay_mean"] = float(g_mean[i])
            out[f"{p}/log_decay_min"] = float(g_min[i])
            out[f"{p}/beta_mean"] = float(b_mean[i])
        self.stats = {}
        return out


# ----------------------------------------------------------------------------- memory
def memory_metrics(device=None, reset_peak: bool = False) -> dict[str, float]:
    """Peak memory in GiB: CUDA ``max_memory_allocated``/``max_memory_reserved`` on GPUs; on CPUs the
    process RSS (psutil) and its peak (``ru_maxrss``). ``reset_peak``: restart the CUDA peak."""
    gib = 2.0**30
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        out = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
               "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    out = {}
    try:
        import psutil

        out["memory/rss_gib"] = psutil.Process().memory_info().rss / gib
    except ImportError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["memory/peak_rss_gib"] = peak / gib if sys.platform == "darwin" else peak * 1024 / gib
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- validation
def validation_metrics(loss_sum: float, loss_tokens: float, tokens: float, seconds: float) -> dict[str, float]:
    """``valid/loss`` (mean per-token loss over ``loss_tokens`` predicted tokens), ``valid/ppl``
    (its exponential; inf past float range), ``valid/tokens_per_s`` (``tokens`` evaluated over all
    ranks per second of the evaluation) and ``valid/tokens``."""
    loss = loss_sum / max(loss_tokens, 1.0)
    return {"valid/loss": loss, "valid/ppl": math.inf if loss > 700 else math.exp(loss),
            "valid/tokens_per_s": tokens / max(seconds, 1e-9), "valid/tokens": tokens}


# ----------------------------------------------------------------------------- writers
def _plain(value):
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


class MetricsLogger:
    """``log(step, metrics)`` appends ``{"step": step, **metrics}`` to ``run_dir/metrics.jsonl`` and,
    when enabled, to Weights & Biases.

    W&B is optional (``pip install wandb`` / the ``wandb`` extra), imported lazily; if it is missing a
    one-line notice is printed and only the JSONL file is written. It is used when there is a
    ``run_dir`` (its files go to ``run_dir/wandb``), ``wandb_project`` is non-empty and ``wandb_mode``
    is not "disabled". Mode: ``wandb_mode`` if given, else
    ``$WANDB_MODE``, else "offline" (sync later with ``wandb sync``); "online" uploads. Runs of a SLURM
    array are grouped by ``$SLURM_ARRAY_JOB_ID`` (named ``<job>_<task>``); ``config`` (the run
    config as a dict) is stored with the run. Create it on one rank only (``enabled``).
    """

    def __init__(self, run_dir: str | Path | None, config: dict | None = None, *, wandb_project: str = "",
                 wandb_mode: str = "", wandb_entity: str = "", run_name: str = "", enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir and enabled else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if enabled and run_dir and wandb_project and wandb_mode != "disabled":
            self.wandb = self._init_wandb(run_dir, config, wandb_project, wandb_mode, wandb_entity, run_name)

    @staticmethod
    def _init_wandb(run_dir, config, project, mode, entity, run_name):
        try:
            import wandb
        except ImportError:
            print("wandb is not installed (pip install wandb); metrics go to metrics.jsonl only", flush=True)
            return None
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        group = os.environ.get("SLURM_ARRAY_JOB_ID") or None
        if not run_name and group:
            run_name = f"{group}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
        kwargs = dict(project=project, mode=mode, config=config or {}, group=group, name=run_name or None)
        if entity:
            kwargs["entity"] = entity
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(run_dir)
        return wandb.init(**kwargs)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
