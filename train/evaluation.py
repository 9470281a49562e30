"""Evaluation of a checkpoint on whole validation documents (``launch/evaluate.py``).

The weights load as training resumes them (any saved layout, resharded to this one; checksums
first), the model runs forward only through the training loop's ``evaluate`` (data, tensor,
pipeline, expert and context parallel alike), and the samples are ``data.evaluation``'s windows
over whole documents: the run's validation documents (or the given prefixes), optionally only those
of at least ``min_document_length`` tokens, each predicted token counted once. The result is one
token-weighted mean loss and its perplexity. The same windows give training's long-document
validation (``train.eval_long_min_length``: ``valid_long/*`` in metrics.jsonl), so a checkpoint
evaluated here with the run's settings reproduces the number training logged at its step. See
docs/training.md, "Evaluation".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from data.evaluation import DocumentWindows, EvaluationLoader
from parallel import state
from train import checkpoint as ckpt
from train import context
from train.config import RunConfig
from train.errors import DataError, agree
from train.loop import data_arguments, evaluate, log
from train.run_state import build_training_model

ROUND = 32  # global batches per call of the loop's evaluate (one progress update each)


@dataclass
class EvaluationRequest:
    """What to evaluate; ``None`` fields take the checkpoint's training values."""

    load: str
    data_prefixes: list[str] | None = None
    min_document_length: int | None = None  # None: the run's eval_long_min_length
    seq_length: int | None = None
    micro_batch_size: int | None = None
    max_tokens: int | None = None  # None: the run's eval_long_max_tokens
    bf16: bool | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    cp_mode: str = "chunkwise"
    progress: bool = True

    def check(self) -> None:
        from model.config import ConfigError

        for name in ("min_document_length", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 0")
        for name in ("seq_length", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")


def _run_config(request: EvaluationRequest, meta: dict, path: Path, dims: state.ParallelDims) -> RunConfig:
    """The checkpoint's run config with this evaluation's layout, sequence and batch sizes."""
    run = RunConfig.from_dict(meta)
    t = run.train
    t.seq_length = request.seq_length or t.seq_length
    t.micro_batch_size = request.micro_batch_size or t.micro_batch_size
    t.global_batch_tokens = 0
    t.global_batch_size = t.micro_batch_size * dims.data
    t.tensor_model_parallel_size = request.tensor_model_parallel_size
    t.pipeline_model_parallel_size = request.pipeline_model_parallel_size
    t.virtual_pipeline_model_parallel_size = 1
    t.expert_model_parallel_size = request.expert_model_parallel_size
    t.context_parallel_size = request.context_parallel_size
    t.cp_mode = request.cp_mode
    t.sequence_parallel = False  # on by itself with MoE and TP > 1 (build_model)
    t.distributed_optimizer, t.recompute_layers, t.compile = False, "", False
    t.bf16 = t.bf16 if request.bf16 is None else request.bf16
    t.save, t.load, t.run_dir = "", str(path), ""
    if t.tokenizer_dir and not Path(t.tokenizer_dir).is_dir():
        t.tokenizer_dir = ""  # recorded on another machine: the data's manifests name theirs
    if request.min_document_length is None:
        request.min_document_length = t.eval_long_min_length
    if request.max_tokens is None:
        request.max_tokens = t.eval_long_max_tokens
    if request.data_prefixes:
        t.data_prefixes, t.data_weights, t.valid_prefixes = list(request.data_prefixes), [], list(request.data_prefixes)
    return run.validate(dims.world_size)


def _documents(run: RunConfig):
    """[(corpus, document ids)] of the run's validation documents (or the given prefixes)."""
    from data import validation_documents

    arguments = data_arguments(run)
    try:
        return validation_documents(**arguments)
    except (ValueError, OSError) as err:  # the data package's messages name the file and the fix
        raise DataError(f"evaluation data: {err}") from None


def select_windows(sources, seq_length: int, min_length: int, max_tokens: int, where: str, flag: str,
                   longer: str) -> DocumentWindows:
    """The windows over the documents of ``sources`` of at least ``min_length`` tokens; when none is
    that long, an error naming ``flag`` (the setting that chose the threshold) and ``longer`` (how
    to give other documents)."""
    if not any(len(ids) for _, ids in sources):
        raise DataError(f"{where} has no documents to evaluate: {longer}")
    windows = DocumentWindows(sources, seq_length, min_length, max_tokens)
    if not windows.documents:
        raise DataError(
            f"no document of {where} has at least {flag} {min_length} tokens (the longest has "
            f"{windows.longest:,}); lower {flag} or {longer}")
    return windows


def _windows(request: EvaluationRequest, run: RunConfig, sources) -> DocumentWindows:
    where = (f"--data-path {' '.join(request.data_prefixes)}" if request.data_prefixes
             else "the run's validation data")
    return select_windows(sources, run.train.seq_length, request.min_document_length, request.max_tokens, where,
                          "--min-document-length", "pass --data-path with prepared token files of longer documents")


def _load_model(run: RunConfig, path: Path, dims: state.ParallelDims):
    """The model as training holds it (bf16 weights, chunked loss, fusion), weights from ``path``."""
    model = build_training_model(run, dims, state.device(), initialize_weights=False)
    agree(ckpt.verify, path)
    agree(ckpt.load_model_state, model, path)
    return model


def evaluate_checkpoint(request: EvaluationRequest) -> dict:
    """Evaluate ``request.load`` on every rank (a collective); returns the result dict on every rank."""
    request.check()
    dims = state.initialize(state.ParallelDims(
        tensor=request.tensor_model_parallel_size, pipeline=request.pipeline_model_parallel_size,
        expert=request.expert_model_parallel_size, context=request.context_parallel_size))
    path = agree(ckpt.resolve, request.load)
    meta = agree(ckpt.read_meta, path)
    run = agree(_run_config, request, meta, path, dims)
    windows = agree(_windows, request, run, agree(_documents, run))
    model = _load_model(run, path, dims)

    slicer = context.ContextSlicer(run.train.cp_mode)
    micro, dp = run.train.micro_batch_size, dims.data
    start = time.time()
    bar = _progress(-(-len(windows) // (micro * dp)), request.progress)
    loss = windows_loss(model, windows, micro, state.device(), slicer, bar)
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    return {
        "loss": loss, "perplexity": math.inf if loss > 700 else math.exp(loss),
        "predicted_tokens": windows.predicted, "documents": windows.documents,
        "min_document_length": request.min_document_length, "max_tokens": request.max_tokens,
        "seq_length": run.train.seq_length, "micro_batch_size": micro, "samples": len(windows),
        "tokens_per_s": windows.predicted / max(seconds, 1e-9),
        "checkpoint": str(path), "step": int(meta.get("step", 0)),
        "data": request.data_prefixes or "validation data of the run",
        "bf16": run.train.bf16, "world_size": dims.world_size,
        "layout": {"data": dp, "tensor": dims.tensor, "pipeline": dims.pipeline, "expert": dims.expert,
                   "context": dims.context, "cp_mode": run.train.cp_mode},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def windows_loss(model, windows: DocumentWindows, micro_batch_size: int, device, slicer, bar=None) -> float:
    """The mean loss over every token the windows predict, through the loop's ``evaluate`` (a
    collective: every rank calls it; each data-parallel rank reads its share of the samples)."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    batches = -(-len(windows) // (micro_batch_size * dp))
    loss_sum = 0.0
    for first in range(0, batches, ROUND):
        count = min(ROUND, batches - first)
        loader = EvaluationLoader(windows, micro_batch_size, rank, dp, first_batch=first)
        metrics = evaluate(model, loader, count, device, slicer)
        # the loop reports the token mean; the windows know how many tokens each batch predicts
        samples = micro_batch_size * dp
        loss_sum += metrics["valid/loss"] * windows.predictions(first * samples, (first + count) * samples)
        if bar is not None:
            bar.update(count)
    return loss_sum / windows.predicted


class LongDocumentValidation:
    """Training's long-document validation: ``windows_loss`` over the run's validation documents of
    at least ``train.eval_long_min_length`` tokens, the same windows at every evaluation."""

    def __init__(self, run: RunConfig, windows: DocumentWindows):
        self.micro_batch_size = run.train.micro_batch_size
        self.min_length = run.train.eval_long_min_length
        self.windows = windows

    def __call__(self, model, step: int, device, slicer) -> dict:
        start = time.time()
        loss = windows_loss(model, self.windows, self.micro_batch_size, device, slicer)
        seconds = time.time() - start
        metrics = {"valid_long/loss": loss, "valid_long/ppl": math.inf if loss > 700 else math.exp(loss),
                   "valid_long/tokens": self.windows.predicted, "valid_long/documents": self.windows.documents,
                   "valid_long/min_length": self.min_length,
                   "valid_long/tokens_per_s": self.windows.predicted / max(seconds, 1e-9)}
        log(f"step {step:6d} | long-document validation loss {loss:.4f} | perplexity {metrics['valid_long/ppl']:.2f} | "
            f"{self.windows.documents:,} documents of >= {self.min_length:,} tokens")
        return metrics


def long_document_validation(run: RunConfig, custom_data: bool = False) -> LongDocumentValidation | None:
    """The long-document validation of ``run`` (None when ``train.eval_long_min_length`` is 0).
    ``custom_data``: the run's loaders come from elsewhere (``train(data=...)``), with no corpus of
    documents to choose from."""
    t = run.train
    if not t.eval_long_min_length:
        return None
    if custom_data:
        from model.config import ConfigError

        raise ConfigError(f"--eval-long-min-length={t.eval_long_min_length}: the long-document validation reads "
                          "the pretraining corpus' validation documents; this run's data comes from elsewhere, "
                          "set it to 0")
    windows = select_windows(_documents(run), t.seq_length, t.eval_long_min_length, t.eval_long_max_tokens,
                             "the run's validation data", "--eval-long-min-length",
                             "give validation documents that are longer (--set train.valid_prefixes=PREFIX)")
    log(f"long-document validation: {windows.documents:,} documents of >= {t.eval_long_min_length:,} tokens, "
        f"{windows.predicted:,} tokens predicted per evaluation")
    return LongDocumentValidation(run, windows)


def _progress(total: int, enabled: bool):
    if not enabled or total <= ROUND or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="batch", desc="evaluation", dynamic_ncols=True)


def summary_line(result: dict) -> str:
    """The one line ``launch/evaluate.py`` prints."""
    selection = (f"{result['documents']:,} documents of >= {result['min_document_length']:,} tokens"
                 if result["min_document_length"] else f"{result['documents']:,} documents")
    return (f"evaluation of {result['checkpoint']} (step {result['step']}): loss {result['loss']:.4f} | perplexity "
            f"{result['perplexity']:.2f} | {result['predicted_tokens']:,} tokens predicted in {selection} | "
            f"seq_length {result['seq_length']:,} | {result['tokens_per_s']:,.0f} tokens/s")


def write_result(result: dict, out: str | Path) -> None:
    """``out`` (JSON), written whole or not at all; rank 0 only."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    log(f"wrote {out}")
