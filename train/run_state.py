"""A training run's state and the work around its steps (train/loop.py drives them).

* ``setup``: process groups, the save-folder lock, the model (recompute, fusion, bf16), the optimizer
  (train/optimizer.py), the data and the context-parallel slicer;
* ``start_logging`` (after the resume, which trims ``metrics.jsonl``): the metrics writer, the gate
  monitor and the profiler;
* after each step: ``step_record`` (the metrics record and the progress line),
  ``run_evaluation`` (the caller's ``evaluation`` hook) and ``save_or_stop`` (periodic and final
  checkpoints, health-checked; exit interval, stop signals, a stop asked for by the evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model import fusion
from model.kda import kernel_options
from model.model import build_model, set_loss_chunk_tokens
from parallel import state as parallel
from train import checkpoint as ckpt
from train import context, resume, signals
from train.config import RunConfig
from train.errors import agree
from train.flops import mfu, peak_flops_per_gpu
from train.health import divergence_error, weights_are_healthy
from train.lock import hold_save_folder
from train.metrics import GateMonitor, MetricsLogger, memory_metrics
from train.optimizer import TrainingOptimizer, build_training_optimizer
from train.precision import to_bf16
from train.profile import StepProfiler


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


@dataclass
class StepResult:
    """What one training step produced (train/loop.py's ``train_step``)."""

    loss: float
    lr: float
    grad_norm: float
    flops: float  # model FLOPs of the whole global batch
    seconds: float
    extra: dict  # detailed statistics and the optimizer's metrics
    first_batch: dict  # this rank's first micro-batch: the health check of a save runs it


@dataclass
class RunState:
    """Everything a run holds from one step to the next."""

    run: RunConfig
    dims: parallel.ParallelDims
    device: torch.device
    model: torch.nn.Module
    optimizer: TrainingOptimizer
    train_loader: object
    valid_loader: object
    slicer: context.ContextSlicer
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    logger: MetricsLogger | None = None
    gates: GateMonitor | None = None
    profiler: StepProfiler | None = None
    peak_flops: float | None = None
    run_start: float = 0.0
    long_validation: object = None  # train.evaluation.LongDocumentValidation with --eval-long-min-length

    @property
    def accumulation(self) -> int:
        """Micro-batches per step on this rank."""
        t = self.run.train
        return t.global_batch_size // (t.micro_batch_size * self.dims.data)

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.global_batch_size * self.run.train.seq_length


def set_recompute(model, spec: str) -> None:
    """``"all"`` or comma-separated global layer indices get activation recompute."""
    if not spec:
        return
    wanted = None if spec == "all" else {int(x) for x in spec.split(",") if x.strip()}
    for index, layer in model.layers.items():
        layer.recompute = wanted is None or int(index) in wanted


def initialize_parallel(t) -> parallel.ParallelDims:
    """megatron-core's process groups for the run's layout."""
    vpp = t.virtual_pipeline_model_parallel_size
    return parallel.initialize(
        parallel.ParallelDims(
            tensor=t.tensor_model_parallel_size,
            pipeline=t.pipeline_model_parallel_size,
            virtual_pipeline=vpp if vpp > 1 else None,
            expert=t.expert_model_parallel_size,
            context=t.context_parallel_size,
            sequence_parallel=t.sequence_parallel,
        ),
        seed=t.seed,
    )


def build_training_model(run: RunConfig, dims: parallel.ParallelDims, device, initialize_weights: bool):
    """This rank's model on its device, with recompute, the chunked loss, fusion and (``--bf16``) bf16
    weights."""
    t = run.train
    model = build_model(run.model, sequence_parallel=t.sequence_parallel or None, seed=t.seed,
                        initialize_weights=initialize_weights, expert_parallel=dims.expert).to(device)
    set_recompute(model, t.recompute_layers)
    set_loss_chunk_tokens(model, t.loss_chunk_tokens)
    fusion.enable(t.compile)
    if t.bf16:  # bf16 weights and compute, fp32 master weights in the optimizer
        to_bf16(model)
        model.config.pipeline_dtype = torch.bfloat16  # activations sent between pipeline stages
    return model


def setup(run: RunConfig, build_data) -> RunState:
    """Everything before the resume. ``build_data``: ``(run, dims) -> (train_loader, valid_loader)``."""
    t = run.train
    dims = initialize_parallel(t)
    run.validate(dims.world_size)
    slicer = context.ContextSlicer(t.cp_mode)
    signals.watch_launcher()
    if t.save:
        hold_save_folder(t.save, t.run_dir, log)
    device = parallel.device()
    load_from = agree(resume.candidates, t)[0]
    # weights loaded next need no initialisation (minutes of CPU time at the 48B size)
    model = build_training_model(run, dims, device, initialize_weights=not load_from)
    optimizer = build_training_optimizer(model, t)
    train_loader, valid_loader = agree(build_data, run, dims)
    return RunState(run, dims, device, model, optimizer, train_loader, valid_loader, slicer)


def start_logging(state: RunState) -> None:
    """The metrics writer (rank 0), gate monitor and profiler; the run's clock starts."""
    t = state.run.train
    rank0 = dist.get_rank() == 0
    state.gates = GateMonitor(state.model)
    state.peak_flops = t.peak_flops_per_gpu or peak_flops_per_gpu()
    state.logger = MetricsLogger(t.run_dir, state.run.to_dict(), wandb_project=t.wandb_project,
                                 wandb_mode=t.wandb_mode, wandb_entity=t.wandb_entity, run_name=t.wandb_run_name,
                                 enabled=rank0)
    state.profiler = StepProfiler(t.profile_step, t.run_dir, write=rank0)
    state.run_start = time.time()


def _memory_text(memory: dict) -> str:
    """The progress line's memory field, from ``memory_metrics``."""
    if "memory/peak_allocated_gib" in memory:
        return f"mem {memory['memory/peak_allocated_gib']:.1f} GiB"
    return f"rss {memory.get('memory/rss_gib', 0.0):.1f} GiB"


def step_record(state: RunState, done: int, result: StepResult) -> dict:
    """The metrics record of step ``done`` (1-based); prints the progress line every
    ``log_interval`` steps and at the last."""
    t, world = state.run.train, dist.get_world_size()
    elapsed, tokens_per_step = result.seconds, state.tokens_per_step
    # ``flops``: the model FLOPs of the whole global batch (summed over DP), shared by all GPUs
    tflops_per_gpu = result.flops / max(elapsed, 1e-9) / world / 1e12
    step_mfu = mfu(result.flops, elapsed, world, state.peak_flops)
    memory = memory_metrics()
    if done % t.log_interval == 0 or done == t.train_iters:
        eta = (time.time() - state.run_start) / (done - state.start_step) * (t.train_iters - done)
        log(f"step {done:6d}/{t.train_iters} | loss {result.loss:.4f} | lr {result.lr:.3e} | grad norm "
            f"{result.grad_norm:.3f} | {tokens_per_step / elapsed:,.0f} tokens/s | {tflops_per_gpu:.2f} TFLOP/s/GPU"
            + (f" | MFU {100 * step_mfu:.1f}%" if step_mfu is not None else "")
            + f" | {_memory_text(memory)} | ETA {eta:,.0f}s")
    first = done - 1 == state.start_step
    return {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_step / elapsed, "tflops_per_gpu": tflops_per_gpu,
            **({"mfu": step_mfu} if step_mfu is not None else {}), "consumed_tokens": done * tokens_per_step,
            "skipped_steps": state.skipped_steps, **memory,
            **getattr(state.train_loader, "source_shares", dict)(), **result.extra,
            **({"kda_kernel_options": kernel_options(state.model)} if first else {})}


def run_evaluation(state: RunState, done: int, evaluation) -> bool:
    """The caller's ``evaluation(model, step)`` hook every ``eval_interval`` steps and at the last
    one; logs its entries. True when it asks to end training before the last step."""
    t = state.run.train
    if evaluation is None or not t.eval_interval or (done % t.eval_interval and done != t.train_iters):
        return False
    results = dict(evaluation(state.model, done))
    stop = bool(results.pop("stop_training", False)) and done < t.train_iters
    if stop:
        log(f"step {done:6d} | the evaluation ended training")
    state.logger.log(done, results)
    return stop


def save_or_stop(state: RunState, done: int, result: StepResult, evaluation_stop: bool) -> bool:
    """Save when due or when the run stops here; True when the run ends after step ``done``
    (exit interval, a stop signal, the evaluation's request)."""
    t = state.run.train
    exit_interval = bool(t.exit_interval) and done % t.exit_interval == 0 and done < t.train_iters
    stop_reason = signals.requested_on_any_rank() if done < t.train_iters else None
    if stop_reason:
        log(f"stop requested ({stop_reason}): saving at step {done} and exiting")
    exiting = exit_interval or evaluation_stop or bool(stop_reason)
    # no periodic save in the middle of a non-finite streak: the newest checkpoint stays the last good step
    periodic = (done % t.save_interval == 0 or done == t.train_iters) and state.nonfinite_in_a_row == 0
    saved = bool(t.save) and (periodic or exiting) and save(state, done, result.first_batch)
    if saved and not exiting and done < t.train_iters:  # a stop requested during this save needs no second one
        stop_reason = signals.requested_on_any_rank()
        if stop_reason:
            log(f"stop requested ({stop_reason}) during the save of step {done}: exiting")
            exiting = True
    if exit_interval and not stop_reason:
        log(f"exit interval reached at step {done}")
    return exiting


def save(state: RunState, done: int, batch: dict) -> bool:
    """Checkpoint step ``done`` if the weights still give a finite loss on ``batch``; True when
    saved. Unhealthy weights after the last step end the run with a divergence error."""
    t, model = state.run.train, state.model
    healthy, check_loss = weights_are_healthy(model, batch)
    if healthy:
        meta = {**state.run.to_dict(), "kda_kernel_options": kernel_options(model),
                "data": state.train_loader.state_dict(), "health": {"loss": check_loss}}
        path = ckpt.save_checkpoint(t.save, done, model, state.optimizer, meta, keep_last=t.keep_last)
        log(f"saved checkpoint {path}")
        return True
    newest = ckpt.latest_step(t.save)
    log(f"step {done}: not saved, the updated weights give a non-finite loss; the newest checkpoint "
        f"stays {ckpt.iteration_dir(t.save, newest) if newest is not None else 'none'}")
    if done == t.train_iters:
        raise divergence_error(f"the weights after the last step ({done}) give a non-finite loss", t.save)
    return False
