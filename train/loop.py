"""The training loop: micro-batches with gradient accumulation to the global batch, DP gradient
averaging, clipping, LR schedule, MoE expert-bias update, progress lines and checkpoints."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model import fusion
from model.config import ConfigError
from model.kda import kernel_options
from model.model import build_model, set_loss_chunk_tokens
from parallel import state
from train import checkpoint as ckpt
from train import context, distributed_optimizer, resume, signals
from train.config import RunConfig
from train.errors import DataError, agree
from train.flops import mfu, model_flops_per_step, peak_flops_per_gpu
from train.grads import all_reduce_data_parallel, all_reduce_sequence_parallel, clip_gradients
from train.health import divergence_error, weights_are_healthy
from train.lock import hold_save_folder, release_save_folder
from train.metrics import (
    GateMonitor,
    MetricsLogger,
    kda_decay_at_zero_input,
    memory_metrics,
    moe_load_metrics,
    validation_metrics,
)
from train.muon import qk_clip, set_max_logit_recording
from train.optim import build_optimizer, qk_clip_enabled
from train.precision import MasterWeights, to_bf16
from train.profile import StepProfiler
from train.schedule import learning_rate
from train.step import forward_backward


def set_recompute(model, spec: str) -> None:
    """``"all"`` or comma-separated global layer indices get activation recompute."""
    if not spec:
        return
    wanted = None if spec == "all" else {int(x) for x in spec.split(",") if x.strip()}
    for index, layer in model.layers.items():
        layer.recompute = wanted is None or int(index) in wanted


def _memory_text(memory: dict) -> str:
    """The progress line's memory field, from ``memory_metrics``."""
    if "memory/peak_allocated_gib" in memory:
        return f"mem {memory['memory/peak_allocated_gib']:.1f} GiB"
    return f"rss {memory.get('memory/rss_gib', 0.0):.1f} GiB"


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _update_expert_bias(model, tconfig) -> None:
    """Aux-loss-free balancing: move each router's expert bias by the sign of (mean load - load)
    over the global batch, then clear the token counters for the next step."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    if tconfig.num_moe_experts:
        _update_router_expert_bias([model], tconfig)
        reset_model_temporary_tensors(tconfig, [model])


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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


def build_data(run: RunConfig, dims: state.ParallelDims):
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
    total = torch.stack([loss_sum, sum(b["loss_mask"].sum() for b in batches).double().cpu(),
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
    try:
        return _train(run, data, evaluation)
    finally:
        release_save_folder()
        signals.clear()


def _train(run: RunConfig, data, evaluation) -> list[float]:
    t = run.train
    dims = state.initialize(
        state.ParallelDims(
            tensor=t.tensor_model_parallel_size,
            pipeline=t.pipeline_model_parallel_size,
            virtual_pipeline=t.virtual_pipeline_model_parallel_size if t.virtual_pipeline_model_parallel_size > 1 else None,
            expert=t.expert_model_parallel_size,
            context=t.context_parallel_size,
            sequence_parallel=t.sequence_parallel,
        ),
        seed=t.seed,
    )
    run.validate(dims.world_size)
    slicer = context.ContextSlicer(t.cp_mode)
    signals.watch_launcher()
    if t.save:
        hold_save_folder(t.save, t.run_dir, log)
    device = state.device()
    load_from = agree(resume.candidates, t)[0]
    # weights loaded next need no initialisation (minutes of CPU time at the 48B size)
    model = build_model(run.model, sequence_parallel=t.sequence_parallel or None, seed=t.seed,
                        initialize_weights=not load_from, expert_parallel=dims.expert).to(device)
    tconfig = model.config
    set_recompute(model, t.recompute_layers)
    set_loss_chunk_tokens(model, t.loss_chunk_tokens)
    fusion.enable(t.compile)
    if t.bf16:  # bf16 weights and compute, fp32 master weights in the optimizer
        to_bf16(model)
        tconfig.pipeline_dtype = torch.bfloat16  # activations sent between pipeline stages
    if t.distributed_optimizer:  # megatron DDP + ZeRO-1 distributed optimizer (AdamW)
        runner, optimizer = distributed_optimizer.wrap(model, t)
    else:
        runner, optimizer = model, build_optimizer(model, t)
        if t.bf16:
            optimizer = MasterWeights(optimizer)
    train_loader, valid_loader = agree(data or build_data, run, dims)
    from train.evaluation import long_document_validation  # imports this module

    long_validation = agree(long_document_validation, run, data is not None)

    start_step = resume.resume(run, model, optimizer, train_loader, log)

    dp = dims.data
    reducing = context.reduction_size() > 1  # over data x context ranks
    accumulation = t.global_batch_size // (t.micro_batch_size * dp)
    tokens_per_step = t.global_batch_size * t.seq_length
    clipping = qk_clip_enabled(t)
    set_max_logit_recording(model, clipping)
    gates = GateMonitor(model)
    peak = t.peak_flops_per_gpu or peak_flops_per_gpu()
    logger = MetricsLogger(t.run_dir, run.to_dict(), wandb_project=t.wandb_project, wandb_mode=t.wandb_mode,
                           wandb_entity=t.wandb_entity, run_name=t.wandb_run_name, enabled=dist.get_rank() == 0)
    losses: list[float] = []
    skipped_steps = nonfinite_in_a_row = 0
    profiler = StepProfiler(t.profile_step, t.run_dir, write=dist.get_rank() == 0)
    run_start = time.time()
    model.train()
    for step in range(start_step, t.train_iters):
        profiler.start(step)
        step_start = time.time()
        lr = learning_rate(step, peak=t.lr, minimum=t.min_lr, warmup=t.lr_warmup_iters, total=t.train_iters,
                           schedule=t.lr_schedule, decay_fraction=t.lr_decay_fraction)
        if t.distributed_optimizer:
            distributed_optimizer.set_lr_and_wd(optimizer, lr, t.weight_decay)
            distributed_optimizer.zero_grad(runner, optimizer)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
        detailed = t.metrics_interval > 0 and (step + 1) % t.metrics_interval == 0
        if detailed:
            gates.arm()
        micro = [_to_device(slicer.slice(next(train_loader)), device) for _ in range(accumulation)]
        local_tokens = sum(m["loss_mask"].sum() for m in micro)
        total_tokens = local_tokens.clone().double()
        if reducing:
            dist.all_reduce(total_tokens, group=context.reduction_group())
        # scale so that the gradients after the DP x CP reduction are those of the global token mean
        loss_sum = forward_backward(runner, micro, context.gradient_scale(total_tokens, t.distributed_optimizer))
        if not t.distributed_optimizer:
            all_reduce_sequence_parallel(model)
            all_reduce_data_parallel(model)
        # detailed statistics read the router counters before the expert-bias update clears them
        extra = {**moe_load_metrics(model), **gates.collect(), **kda_decay_at_zero_input(model)} if detailed else {}
        # this rank's share of the FLOPs of its whole sequences (each CP rank counts 1/CP of them)
        flops = model_flops_per_step(
            run.model, cu_seqlens_list=[context.global_cu_seqlens(m).cpu() for m in micro])["total"] / slicer.size
        sums = torch.tensor([float(loss_sum), float(flops)], dtype=torch.float64)
        if reducing:
            dist.all_reduce(sums, group=context.reduction_group())
        loss_sum, flops = sums[0], float(sums[1])
        loss = float(loss_sum / total_tokens.cpu())
        if t.distributed_optimizer:
            if math.isfinite(loss):  # megatron reduces, clips and steps; it also moves the expert bias
                with torch.profiler.record_function("optimizer"):
                    _, grad_norm = distributed_optimizer.finish_step(runner, optimizer)
            else:
                grad_norm = float("nan")
            from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors

            reset_model_temporary_tensors(tconfig, [model])
        else:
            with torch.profiler.record_function("optimizer"):
                grad_norm = clip_gradients(model, t.clip_grad)
        if t.distributed_optimizer and math.isfinite(loss) and math.isfinite(grad_norm):
            nonfinite_in_a_row = 0
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            _update_expert_bias(model, tconfig)
            with torch.profiler.record_function("optimizer"):
                optimizer.step()
            if clipping:
                extra.update({f"qk_clip/{k}": v for k, v in qk_clip(model, t.qk_clip_tau).items()})
            nonfinite_in_a_row = 0
        else:  # skip the update, keep the weights; stop after too many in a row
            optimizer.zero_grad(set_to_none=True)
            from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors

            reset_model_temporary_tensors(tconfig, [model])
            skipped_steps += 1
            nonfinite_in_a_row += 1
            log(f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
                f"({nonfinite_in_a_row} in a row, {skipped_steps} in total)")
            if nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise divergence_error(f"{nonfinite_in_a_row} consecutive steps with non-finite loss or gradients "
                                       f"(last at step {step + 1})", t.save)
        losses.append(loss)
        elapsed = time.time() - step_start
        profiler.stop()  # after the step's clock: reading the trace takes a while
        done = step + 1
        # ``flops``: the model FLOPs of the whole global batch (summed over DP), shared by all GPUs
        tflops_per_gpu = flops / max(elapsed, 1e-9) / dist.get_world_size() / 1e12
        step_mfu = mfu(flops, elapsed, dist.get_world_size(), peak)
        memory = memory_metrics()
        if done % t.log_interval == 0 or done == t.train_iters:
            eta = (time.time() - run_start) / (done - start_step) * (t.train_iters - done)
            log(f"step {done:6d}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_step / elapsed:,.0f} tokens/s | {tflops_per_gpu:.2f} TFLOP/s/GPU"
                + (f" | MFU {100 * step_mfu:.1f}%" if step_mfu is not None else "")
                + f" | {_memory_text(memory)} | ETA {eta:,.0f}s")
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed,
                  "tflops_per_gpu": tflops_per_gpu, **({"mfu": step_mfu} if step_mfu is not None else {}),
                  "consumed_tokens": done * tokens_per_step, "skipped_steps": skipped_steps, **memory,
                  **getattr(train_loader, "source_shares", dict)(), **extra,
                  **({"kda_kernel_options": kernel_options(model)} if step == start_step else {})}
        if t.eval_interval and valid_loader is not None and done % t.eval_interval == 0:
            valid = evaluate(model, valid_loader, t.eval_iters, device, slicer)
            log(f"step {done:6d} | validation loss {valid['valid/loss']:.4f} | perplexity {valid['valid/ppl']:.2f} | "
                f"{valid['valid/tokens_per_s']:,.0f} tokens/s")
            record.update(valid)
            if long_validation is not None:
                record.update(long_validation(model, done, device, slicer))
        logger.log(done, record)
        exit_interval = bool(t.exit_interval) and done % t.exit_interval == 0 and done < t.train_iters
        evaluation_stop = False
        if evaluation is not None and t.eval_interval and (done % t.eval_interval == 0 or done == t.train_iters):
            results = dict(evaluation(model, done))
            if results.pop("stop_training", False) and done < t.train_iters:
                log(f"step {done:6d} | the evaluation ended training")
                evaluation_stop = True
            logger.log(done, results)
        stop_reason = signals.requested_on_any_rank() if done < t.train_iters else None
        if stop_reason:
            log(f"stop requested ({stop_reason}): saving at step {done} and exiting")
        exiting = exit_interval or evaluation_stop or bool(stop_reason)
        # no periodic save in the middle of a non-finite streak: the newest checkpoint stays the last good step
        periodic = (done % t.save_interval == 0 or done == t.train_iters) and nonfinite_in_a_row == 0
        if t.save and (periodic or exiting):
            healthy, check_loss = weights_are_healthy(model, micro[0])
            if healthy:
                meta = {**run.to_dict(), "kda_kernel_options": kernel_options(model), "data": train_loader.state_dict(),
                        "health": {"loss": check_loss}}
                path = ckpt.save_checkpoint(t.save, done, model, optimizer, meta, keep_last=t.keep_last)
                log(f"saved checkpoint {path}")
                if not exiting and done < t.train_iters:  # a stop requested during this save needs no second one
                    stop_reason = signals.requested_on_any_rank()
                    if stop_reason:
                        log(f"stop requested ({stop_reason}) during the save of step {done}: exiting")
                        exiting = True
            else:
                newest = ckpt.latest_step(t.save)
                log(f"step {done}: not saved, the updated weights give a non-finite loss; the newest checkpoint "
                    f"stays {ckpt.iteration_dir(t.save, newest) if newest is not None else 'none'}")
                if done == t.train_iters:
                    raise divergence_error(f"the weights after the last step ({done}) give a non-finite loss", t.save)
        if exit_interval and not stop_reason:
            log(f"exit interval reached at step {done}")
        if exiting:
            break
    logger.close()
    return losses
