"""``launch/pretrain.py --dry-run``: a run's model built on the meta device (shapes only, no weights
allocated and no initialisation), with its size, per-layer layout, FLOPs per token and an estimate
of the memory per GPU for the run's parallel layout, before any GPU is asked for.

Parameters per GPU are exact: every parameter of the whole (TP=1) model is assigned to the pipeline
rank holding its layer (embedding: the first stage, final norm and LM head: the last) and divided
by the tensor-parallel size if megatron splits it, and by the expert-parallel size if it belongs
to a routed expert (experts are split over TP too: megatron's expert-TP size defaults to TP).
Bytes per parameter and the activation model (train/activation_memory.py): ``docs/training.md``,
"Dry run and memory estimate". ``find_max_seq_length`` searches the longest sequence whose estimate
fits a GPU (``--dry-run --find-max-seq-length``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from model import mixers
from train.activation_memory import activation_bytes, gathered_keys, gathers_keys
from train.config import RunConfig
from train.errors import ConfigError

GIB = 2.0**30
ROUTED_EXPERT = ".experts.local_experts."
# --device-memory-gib: an H200 (sold as 141 GB; CUDA reports 139.8 GiB). What the search may fill of a
# device: its memory less the CUDA context, NCCL and cuBLAS workspaces (RESERVE_GIB) and a margin for
# the allocator's fragmentation and the estimate's error (MARGIN, of the rest)
DEFAULT_DEVICE_MEMORY_GIB = 139.8
# the loss chunk --dry-run --find-max-seq-length also tries when a run does not chunk its loss: the 48B
# preset's 4,096-token chunk holds 3.75 GiB of logits at TP 1, and its matmuls stay large
SUGGESTED_LOSS_CHUNK_TOKENS = 4096
RESERVE_GIB = 2.0
MARGIN = 0.05


def usable_bytes(device_memory_gib: float) -> float:
    """Bytes the memory estimate may reach on a device of ``device_memory_gib`` GiB."""
    if not device_memory_gib > RESERVE_GIB:
        raise ConfigError(f"--device-memory-gib={device_memory_gib}: must be more than the {RESERVE_GIB:g} GiB "
                          f"reserved for the CUDA context and communication buffers (an H200: 139.8)")
    return (device_memory_gib - RESERVE_GIB) * (1 - MARGIN) * GIB


@dataclass
class RankMemory:
    """Estimated bytes on one GPU of pipeline rank ``pipeline_rank``."""

    pipeline_rank: int
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class DryRun:
    name: str
    total_parameters: int  # including the router expert-bias buffers, as the HF checkpoint counts
    activated_parameters: int  # per token: all but the routed experts a token does not use
    embedding_parameters: int  # embedding + LM head
    layers: list[dict]  # index, mixer, ffn, parameters, pipeline_rank
    flops_per_token: float  # training (3 x forward), documents of seq_length tokens
    layout: dict
    memory: list[RankMemory] = field(default_factory=list)
    on_meta: bool = True  # every parameter lives on the meta device


def _owner_rank(layer: int, name: str, num_layers: int, pp: int, vpp: int) -> int:
    """Pipeline rank that holds a parameter (layer -1: embedding or final norm / LM head)."""
    from model.model import stage_layers

    stages = pp * vpp
    if layer < 0:
        return 0 if name.startswith("embedding.") else (stages - 1) % pp
    for stage in range(stages):
        if layer in stage_layers(num_layers, stages, stage):
            return stage % pp
    raise ValueError(f"layer {layer} is in no pipeline stage")


def _layer_index(name: str) -> int:
    from train.metrics import _layer_index as index

    return index(name)


def dry_run(run: RunConfig, world_size: int | None = None) -> DryRun:
    """Validate ``run`` for ``world_size`` GPUs (default: the smallest layout that fits, DP = EP) and
    build its model on the meta device; see the module docstring."""
    from model.model import build_model, count_parameters, stage_layers
    from parallel import state
    from train import distributed_optimizer
    from train.flops import model_flops_per_step
    from train.optim import uses_muon
    from train.precision import keeps_fp32

    t, config = run.train, run.model
    tp, pp, cp, ep = (t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size,
                      t.expert_model_parallel_size)
    vpp = max(t.virtual_pipeline_model_parallel_size, 1)
    world_size = world_size or tp * pp * cp * ep
    run.validate(world_size)
    state.ParallelDims(tensor=tp, pipeline=pp, expert=ep, context=cp, virtual_pipeline=vpp if vpp > 1 else None,
                       sequence_parallel=t.sequence_parallel, world_size=world_size).validate()
    if t.distributed_optimizer:
        distributed_optimizer.check(t)
    dp = world_size // (tp * pp * cp)
    expert_dp = world_size // (tp * ep * pp)
    sequence_parallel = t.sequence_parallel or (tp > 1 and "moe" in config.ffn_types)

    state.initialize(state.ParallelDims(), seed=t.seed)  # one process: the whole model at TP = PP = EP = 1
    with torch.device("meta"):
        model = build_model(config, initialize_weights=False)
    on_meta = all(p.device.type == "meta" for p in model.parameters())

    total = count_parameters(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ROUTED_EXPERT in n)
    inactive = routed * (config.num_experts - config.num_experts_per_token) // max(config.num_experts, 1)
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embedding.", "output_layer.")))
    per_layer_bias: dict[int, int] = {}

    for name, buffer in model.named_buffers():  # the router expert biases, counted in the total
        if name.endswith("expert_bias"):
            per_layer_bias[_layer_index(name)] = per_layer_bias.get(_layer_index(name), 0) + buffer.numel()
    stages = pp * vpp
    layers_per_chunk = [list(stage_layers(config.num_layers, stages, s)) for s in range(stages)]
    per_layer = [per_layer_bias.get(i, 0) for i in range(config.num_layers)]
    ranks = [RankMemory(r, 0, 0.0, 0.0, 0.0, 0.0) for r in range(pp)]
    for name, p in model.named_parameters():
        layer = _layer_index(name)
        if layer >= 0:
            per_layer[layer] += p.numel()
        local = p.numel() / (tp if getattr(p, "tensor_model_parallel", False) else 1)
        expert = ROUTED_EXPERT in name
        local /= ep if expert else 1
        rank = ranks[_owner_rank(layer, name, config.num_layers, pp, vpp)]
        weight = 4 if not t.bf16 or keeps_fp32(name, p) else 2
        rank.parameters += local
        rank.weights += local * weight
        if t.distributed_optimizer:  # fp32 grad buffer; fp32 main weights (bf16) and Adam state sharded over DP x CP
            rank.grads += local * 4
            rank.optimizer += local * ((4 if weight == 2 else 0) + 8) / (expert_dp if expert else dp * cp)
        else:  # grads in the parameter's dtype; fp32 master (bf16) and Muon momentum or Adam moments
            rank.grads += local * weight
            moments = 4 if t.optimizer == "muon" and uses_muon(name, p) else 8
            rank.optimizer += local * ((4 if weight == 2 else 0) + moments)
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    for rank in ranks:
        rank.parameters = int(round(rank.parameters))
        rank.activations = activation_bytes(run, layers_per_chunk, rank.pipeline_rank, micro_batches,
                                            sequence_parallel)

    flops = model_flops_per_step(config, seq_length=t.seq_length)
    owner = {i: s % pp for s, chunk in enumerate(layers_per_chunk) for i in chunk}
    layers = [dict(index=i, mixer=config.layer_types[i], ffn=config.ffn_types[i], parameters=per_layer[i],
                   pipeline_rank=owner[i]) for i in range(config.num_layers)]
    layout = dict(world_size=world_size, tensor=tp, pipeline=pp, virtual_pipeline=vpp, expert=ep, context=cp,
                  data=dp, expert_data=expert_dp, sequence_parallel=sequence_parallel, micro_batches=micro_batches,
                  micro_batch_tokens=t.micro_batch_size * t.seq_length, seq_length=t.seq_length, bf16=t.bf16,
                  optimizer=t.optimizer,
                  distributed_optimizer=t.distributed_optimizer, recompute=t.recompute_layers or "none",
                  loss_chunk_tokens=t.loss_chunk_tokens,
                  cp_mode=t.cp_mode, gathered_keys=gathered_keys(t) if gathers_keys(config) else 0)
    return DryRun(name=config.name, total_parameters=total, activated_parameters=total - inactive,
                  embedding_parameters=embedding, layers=layers, flops_per_token=flops["total"] / flops["tokens"],
                  layout=layout, memory=ranks, on_meta=on_meta)


def _compact(pattern: list[str]) -> str:
    """``kda kda kda mla ...`` -> ``KKKA...`` (the layer-pattern symbols)."""
    return "".join(mixers.of_kind(x).symbol for x in pattern)


def format_report(report: DryRun) -> str:
    lay = report.layout
    lines = [
        f"dry run of {report.name}: model built on the meta device (no weights allocated)",
        f"parameters: {report.total_parameters:,} total, {report.activated_parameters:,} activated per token "
        f"({report.activated_parameters - report.embedding_parameters:,} without embedding and LM head)",
        f"layers: {_compact([x['mixer'] for x in report.layers])} ({mixers.known()})",
        "  layer  mixer  ffn     parameters  pipeline rank",
    ]
    lines += [f"  {x['index']:5d}  {x['mixer']:5s}  {x['ffn']:5s}  {x['parameters']:>13,}  {x['pipeline_rank']:>13d}"
              for x in report.layers]
    lines += [
        f"training FLOPs per token: {report.flops_per_token:,.0f} (3 x forward, documents of "
        f"{lay['seq_length']:,} tokens)",
        f"layout: {lay['world_size']} GPU{'s' if lay['world_size'] > 1 else ''} = TP {lay['tensor']} x "
        f"PP {lay['pipeline']} x CP {lay['context']}"
        + (f" ({lay['cp_mode']})" if lay["context"] > 1 else "") + " x "
        f"DP {lay['data']} (EP {lay['expert']}, expert DP {lay['expert_data']}"
        + (f", virtual PP {lay['virtual_pipeline']}" if lay["virtual_pipeline"] > 1 else "")
        + f"); sequence parallel {'on' if lay['sequence_parallel'] else 'off'}; "
        f"{'bf16 + fp32 masters' if lay['bf16'] else 'fp32'}; {lay['optimizer']}"
        + (" (distributed optimizer)" if lay["distributed_optimizer"] else "")
        + f"; recompute {lay['recompute']}"
        + (f"; loss in chunks of {lay['loss_chunk_tokens']:,} tokens" if lay["loss_chunk_tokens"] else "")
        + f"; {lay['micro_batches']} micro-batches of "
        f"{lay['micro_batch_tokens']:,} tokens",
        "memory per GPU, estimate in GiB (docs/training.md, \"Dry run and memory estimate\"):",
        "  pipeline rank  parameters        weights   grads  optimizer  activations   total",
    ]
    lines += [f"  {m.pipeline_rank:13d}  {m.parameters:>16,}  {m.weights / GIB:7.2f}  {m.grads / GIB:6.2f}  "
              f"{m.optimizer / GIB:9.2f}  {m.activations / GIB:11.2f}  {m.total / GIB:6.2f}" for m in report.memory]
    if lay["context"] > 1:
        lines.append("  (activations: the larger of the first and the last context-parallel rank"
                     + (f"; on the last, one document spanning each sample, every MLA layer holds "
                        f"{lay['gathered_keys']:,} keys gathered from earlier ranks)" if lay["gathered_keys"] else ")"))
    return "\n".join(lines)


@dataclass
class SequenceFit:
    """The longest ``seq_length`` (a multiple of ``step``) whose estimated peak fits ``budget`` bytes on
    every GPU of the layout; 0 when not even ``step`` fits. ``peak`` / ``next_peak``: the largest
    per-GPU estimate at ``seq_length`` and at ``seq_length + step``; ``at_limit``: the search stopped
    at its upper limit (longer sequences may fit too); ``loss_chunk_tokens``: the run's chunked LM head
    loss (0 = off)."""

    recompute: str
    seq_length: int
    step: int
    budget: float
    peak: float
    next_peak: float
    at_limit: bool = False
    loss_chunk_tokens: int = 0


def peak_bytes(run: RunConfig, report: DryRun) -> float:
    """Largest per-GPU estimate for ``run`` (its current seq_length) in the layout of ``report``."""
    from model.model import stage_layers

    lay = report.layout
    stages = lay["pipeline"] * lay["virtual_pipeline"]
    chunks = [list(stage_layers(run.model.num_layers, stages, s)) for s in range(stages)]
    return max(m.weights + m.grads + m.optimizer
               + activation_bytes(run, chunks, m.pipeline_rank, lay["micro_batches"], lay["sequence_parallel"])
               for m in report.memory)


def find_max_seq_length(run: RunConfig, world_size: int | None = None,
                        device_memory_gib: float = DEFAULT_DEVICE_MEMORY_GIB, step: int | None = None,
                        limit: int = 1 << 24) -> SequenceFit:
    """Binary search over multiples of ``step`` (default 1024 x CP, so every context-parallel slice is
    a multiple of 1024 tokens) for the longest sequence whose estimate fits ``usable_bytes`` of a
    device of ``device_memory_gib`` on every GPU, at the run's layout, micro-batch size and global
    batch in sequences (with pipeline parallelism it sets the micro-batches in flight). The estimate
    grows monotonically with the length. The layout is validated once (ConfigError as in a run)."""
    budget = usable_bytes(device_memory_gib)
    cp = run.train.context_parallel_size
    step = step or 1024 * cp
    if step <= 0 or step % cp:
        raise ConfigError(f"sequence-length step {step}: must be a positive multiple of --context-parallel-size {cp}")
    probe = copy.deepcopy(run)
    probe.train.global_batch_tokens = 0  # the global batch stays this many sequences at every length
    probe.train.seq_length = step
    report = dry_run(probe, world_size)

    def peak(multiple: int) -> float:
        probe.train.seq_length = multiple * step
        return peak_bytes(probe, report)

    chunk = run.train.loss_chunk_tokens
    fit = SequenceFit(recompute=run.train.recompute_layers or "none", seq_length=0, step=step, budget=budget,
                      peak=0.0, next_peak=peak(1), loss_chunk_tokens=chunk)
    if fit.next_peak > budget:
        return fit
    good, bad, top = 1, 2, max(limit // step, 1)
    while bad <= top and peak(bad) <= budget:
        good, bad = bad, bad * 2
    if bad > top:
        if peak(top) <= budget:
            return SequenceFit(fit.recompute, top * step, step, budget, peak(top), peak(top + 1), at_limit=True,
                               loss_chunk_tokens=chunk)
        bad = top
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if peak(middle) <= budget else (good, middle)
    return SequenceFit(fit.recompute, good * step, step, budget, peak(good), peak(good + 1), loss_chunk_tokens=chunk)


def format_fits(fits: list[SequenceFit], micro_batch_size: int) -> str:
    first = fits[0]
    lines = [f"longest sequence whose estimate fits {first.budget / GIB:.1f} GiB per GPU (--device-memory-gib "
             f"less {RESERVE_GIB:g} GiB reserved, less {MARGIN:.0%}; micro-batch size {micro_batch_size}, in steps "
             f"of {first.step:,} tokens):"]
    for fit in fits:
        head = f"  recompute {fit.recompute}" + (
            f", loss in chunks of {fit.loss_chunk_tokens:,} tokens: " if fit.loss_chunk_tokens else ": ")
        if not fit.seq_length:
            lines.append(head + f"none: {fit.step:,} tokens already need {fit.next_peak / GIB:.1f} GiB")
            continue
        more = " (the search's limit: longer may fit)" if fit.at_limit else ""
        lines.append(head + f"{fit.seq_length:,} tokens ({fit.peak / GIB:.1f} GiB; "
                     f"{fit.seq_length + fit.step:,} tokens: {fit.next_peak / GIB:.1f} GiB){more}")
    return "\n".join(lines)
