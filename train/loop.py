"""The training loop: each step runs the global batch's micro-batches (gradient accumulation),
reduces the token counts, loss and FLOPs over the data x context ranks, and hands the gradients to
the optimizer (train/optimizer.py: reduction, clipping, update, or a skipped update after a
non-finite loss or gradient norm). Setup, logging and saving are in train/run_state.py."""

from __future__ import annotations

import gc
import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kernels.host_values import to_device
from model.config import ConfigError
from parallel.state import ParallelDims
from train import context, resume, signals
from train.config import RunConfig
from train.errors import DataError, agree
from train.flops import model_flops_per_step
from train.health import divergence_error
from train.host_copy import HostCopy
from train.lock import release_save_folder
from train.metrics import kda_decay_at_zero_input, moe_load_metrics, validation_metrics
from train.run_state import (
    RunState,
    StepResult,
    log,
    run_evaluation,
    save_or_stop,
    setup,
    start_logging,
    step_record,
)
from train.schedule import learning_rate
from train.step import forward_backward


BOUNDARY_KEYS = ("cu_seqlens", "global_cu_seqlens")  # document boundaries (the latter: a CP rank's whole sequence)


def _to_device(batch: dict, device) -> dict:
    """The micro-batch on ``device``; the host keeps the document boundaries' values, so the model's
    reads of them (validation, KDA chunk tables) do not wait for the GPU (kernels/host_values.py)."""
    def move(key, value):
        if not torch.is_tensor(value):
            return value
        if key in BOUNDARY_KEYS and value.device.type == "cpu":
            return to_device(value, device, keep_host_copy=True)
        return value.to(device, non_blocking=True)

    return {k: move(k, v) for k, v in batch.items()}


def data_arguments(run: RunConfig) -> dict:
    """Where the run's documents come from, as the keyword arguments of the data package's
    ``build_pretraining_loaders`` / ``validation_documents``. Records the run's tokenizer in
    ``train.tokenizer_dir`` (the checkpoints' meta.json; the HF export ships it): the given one,
    checked against the data, or the one the data's manifests name."""
    from data import ensure_default_dataset, tokenizer_of_data

    t = run.train
    train_prefixes, valid_prefixes = list(t.data_prefixes), list(t.valid_prefixes) or None
    given_tokenizer = known_tokenizer = t.tokenizer_dir
    if not train_prefixes:
        default = ensure_default_dataset(t.data_cache_dir)
        train_prefixes, valid_prefixes = list(default.train_prefixes), list(default.valid_prefixes)
        known_tokenizer = given_tokenizer or default.tokenizer_dir  # where the cache is now
    try:
        t.tokenizer_dir = tokenizer_of_data(train_prefixes + (valid_prefixes or []), known_tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    weights = t.data_weights or None
    blend = list(zip(weights, train_prefixes)) if weights else None
    return dict(data_prefixes=None if blend else train_prefixes, blend=blend, valid_prefixes=valid_prefixes,
                vocab_size=run.model.vocab_size,
                tokenizer_dir=given_tokenizer or None)  # its vocabulary must fit the model


def build_data(run: RunConfig, dims: ParallelDims):
    """The train and validation loaders (``data_arguments``)."""
    from data import build_pretraining_loaders

    t = run.train
    arguments = data_arguments(run)
    try:
        return build_pretraining_loaders(
            **arguments,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            seed=t.seed,
            reset_at_document_boundaries=t.reset_at_document_boundaries,
        )
    except (ValueError, OSError) as err:  # the data package's messages name the file and the fix
        raise DataError(f"training data: {err}") from None


def evaluate(model, loader, iters: int, device, slicer=None) -> dict:
    """The validation metrics (``validation_metrics``) over ``iters`` micro-batches per DP rank, the
    same batches at every evaluation (each CP rank its slice: ``slicer``, train/context.py)."""
    start = time.time()
    model.eval()
    loader.reset()
    cut = slicer.slice if slicer is not None else (lambda batch: batch)
    batches = [_to_device(cut(next(loader)), device) for _ in range(iters)]
    loss_sum = forward_backward(model, batches, torch.ones(()), forward_only=True)
    total = torch.stack([loss_sum.cpu(), sum(b["loss_mask"].sum() for b in batches).double().cpu(),
                         torch.tensor(float(sum(b["tokens"].numel() for b in batches)), dtype=torch.float64)])
    if dist.is_initialized():  # on the device: NCCL reduces no CPU tensors
        total = total.to(device)
        dist.all_reduce(total, group=context.reduction_group())
        total = total.cpu()
    model.train()
    loss_sum, loss_tokens, tokens = total.tolist()
    return validation_metrics(loss_sum, loss_tokens, tokens, time.time() - start)


def train(run: RunConfig, data=None, evaluation=None) -> list[float]:
    """Run the configured training; returns the loss of every step run by this process.

    ``data``: ``(run, dims) -> (train_loader, valid_loader or None)`` in place of the pretraining
    corpus (``build_data``); the loaders yield micro-batches in its format (launch/synthetic.py).
    ``evaluation``: ``(model, step) -> dict`` called on every rank every ``eval_interval`` steps and
    at the last step; its entries are logged (metrics.jsonl, W&B), and a true ``"stop_training"``
    entry ends the run after this step, saving a checkpoint when ``--save`` is set.
    """
    signals.install()
    gc_was_enabled = gc.isenabled()
    try:
        return _train(run, data, evaluation)
    finally:
        release_save_folder()
        signals.clear()
        if gc_was_enabled:
            gc.enable()


def _train(run: RunConfig, data, evaluation) -> list[float]:
    state = setup(run, data or build_data)
    from train.evaluation import long_document_validation  # imports this module

    state.long_validation = agree(long_document_validation, run, data is not None)
    state.start_step = resume.resume(run, state.model, state.optimizer, state.train_loader, log)
    start_logging(state)
    state.model.train()
    gc_interval = run.train.gc_interval
    if gc_interval:  # collections at fixed steps (the config field says why)
        gc.collect()
        gc.disable()
    for step in range(state.start_step, run.train.train_iters):
        state.profiler.start(step)
        result = train_step(state, step)
        state.profiler.stop()  # after the step's clock: reading the trace takes a while
        if gc_interval and (step + 1) % gc_interval == 0:
            gc.collect(1)
        if _after_step(state, step + 1, result, evaluation):
            break
    state.logger.close()
    return state.losses


def _after_step(state: RunState, done: int, result: StepResult, evaluation) -> bool:
    """Metrics, validation, the evaluation hook and the save/stop decision; True: stop here."""
    t = state.run.train
    record = step_record(state, done, result)
    if t.eval_interval and state.valid_loader is not None and done % t.eval_interval == 0:
        valid = evaluate(state.model, state.valid_loader, t.eval_iters, state.device, state.slicer)
        log(f"step {done:6d} | validation loss {valid['valid/loss']:.4f} | perplexity {valid['valid/ppl']:.2f} | "
            f"{valid['valid/tokens_per_s']:,.0f} tokens/s")
        record.update(valid)
        if state.long_validation is not None:
            record.update(state.long_validation(state.model, done, state.device, state.slicer))
    state.logger.log(done, record)
    evaluation_stop = run_evaluation(state, done, evaluation)
    return save_or_stop(state, done, result, evaluation_stop)


def train_step(state: RunState, step: int) -> StepResult:
    """Step ``step`` (0-based): forward and backward over this rank's micro-batches, the global
    loss and FLOPs, and the optimizer's update (skipped when the loss or gradient norm is not finite)."""
    t, optimizer = state.run.train, state.optimizer
    step_start = time.time()
    lr = learning_rate(step, peak=t.lr, minimum=t.min_lr, warmup=t.lr_warmup_iters, total=t.train_iters,
                       schedule=t.lr_schedule, decay_fraction=t.lr_decay_fraction)
    optimizer.begin_step(lr)
    detailed = t.metrics_interval > 0 and (step + 1) % t.metrics_interval == 0
    if detailed:
        state.gates.arm()
    host = [state.slicer.slice(next(state.train_loader)) for _ in range(state.accumulation)]
    micro = [_to_device(m, state.device) for m in host]
    reducing = context.reduction_size() > 1  # over data x context ranks
    total_tokens = sum(m["loss_mask"].sum() for m in micro).clone().double()
    if reducing:
        dist.all_reduce(total_tokens, group=context.reduction_group())
    # scaled so that the gradients after the DP x CP reduction are those of the global token mean
    loss_sum = forward_backward(optimizer.runner, micro, optimizer.loss_scale(total_tokens))
    # this rank's share of the FLOPs of its whole sequences (each CP rank counts 1/CP of them), from
    # the host copies of the batches (a device copy would wait for the GPU) while the GPU still runs
    # the backward that was just queued
    documents = [context.global_cu_seqlens(m) for m in host]
    flops = model_flops_per_step(state.run.model, cu_seqlens_list=documents)["total"] / state.slicer.size
    optimizer.reduce_gradients()
    # detailed statistics read the router counters before the update's expert-bias step clears them
    model = state.model
    extra = {**moe_load_metrics(model), **state.gates.collect(), **kda_decay_at_zero_input(model)} if detailed else {}
    # on the device until the step's one read below (a fill, not a copy from the host: that would wait)
    sums = torch.stack([loss_sum, torch.full((), flops, dtype=torch.float64, device=loss_sum.device)])
    if reducing:
        dist.all_reduce(sums, group=context.reduction_group())
    mean_loss = sums[0] / total_tokens
    # copied before the update's kernels are queued and read after: the host waits for these values
    # (and the norm), not for the optimizer's kernels, and builds the next batch while they run
    read = HostCopy(torch.stack([mean_loss, sums[1]]))
    grad_norm, update_metrics = optimizer.update(mean_loss)
    extra.update(update_metrics)
    loss, flops = (float(x) for x in read.get())
    grad_norm = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        state.nonfinite_in_a_row = 0
    else:
        optimizer.discard_step()
        _count_nonfinite(state, step + 1, loss, grad_norm)
    state.losses.append(loss)
    return StepResult(loss, lr, grad_norm, flops, time.time() - step_start, extra, micro[0])


def _count_nonfinite(state: RunState, done: int, loss: float, grad_norm: float) -> None:
    """A skipped update: keep the weights, stop after ``max_nonfinite_steps`` in a row."""
    t = state.run.train
    state.skipped_steps += 1
    state.nonfinite_in_a_row += 1
    log(f"step {done}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
        f"({state.nonfinite_in_a_row} in a row, {state.skipped_steps} in total)")
    if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
        raise divergence_error(f"{state.nonfinite_in_a_row} consecutive steps with non-finite loss or gradients "
                               f"(last at step {done})", t.save)
