"""``launch/pretrain.py --dry-run``: a run's model built on the meta device (shapes only, no weights
allocated and no initialisation), with its size, per-layer layout, FLOPs per token and an estimate
of the memory per GPU for the run's parallel layout, before any GPU is asked for.

Parameters per GPU are exact: every parameter of the whole (TP=1) model is assigned to the pipeline
rank holding its layer (embedding: the first stage, final norm and LM head: the last) and divided
by the tensor-parallel size if megatron splits it, and by the expert-parallel size if it belongs
to a routed expert (experts are split over TP too: megatron's expert-TP size defaults to TP).
Bytes per parameter and the activation model: ``docs/training.md``, "Dry run and memory estimate".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import mixers
from train.config import RunConfig

GIB = 2.0**30
ROUTED_EXPERT = ".experts.local_experts."


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


def activation_elements(config, mixer: str, ffn: str, expert_parallel: int) -> dict[str, float]:
    """Activation elements per token one layer keeps for its backward (``docs/training.md``):
    ``split`` (sharded over TP by heads or widths), ``tokens`` (whole per token; sharded over TP
    only under sequence parallelism) and ``fp32`` (held in fp32 whatever the compute dtype, head-split)."""
    d = config.hidden_size
    out = {"split": 0.0, "tokens": 4.0 * d, "fp32": 0.0}  # two norms: input and output each
    for key, value in mixers.of_kind(mixer).activations(config).items():  # model/mixers.py
        out[key] += value
    if ffn == "dense":
        out["split"] += 3 * config.intermediate_size  # [gate; up] and the SwiGLU output
    else:
        k, width = config.num_experts_per_token, config.moe_intermediate_size
        out["split"] += (k + config.num_shared_experts) * 3 * width
        # routed copies of the input and output, and the allgather dispatcher's gathered input
        out["tokens"] += 2 * k * d + expert_parallel * d
        out["fp32"] += config.num_experts  # router scores
    return out


def _activation_bytes(run: RunConfig, layers_per_chunk: list[list[int]], rank: int, micro_batches: int,
                      sequence_parallel: bool) -> float:
    """Peak activation bytes on one GPU of pipeline rank ``rank`` (``docs/training.md``)."""
    config, t = run.model, run.train
    tp, pp, vpp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.virtual_pipeline_model_parallel_size
    tokens = t.micro_batch_size * t.seq_length // t.context_parallel_size  # this rank's slice under CP
    low = 2 if t.bf16 else 4
    token_share = tokens / tp if sequence_parallel else tokens
    recompute = (None if not t.recompute_layers else
                 set(range(config.num_layers)) if t.recompute_layers == "all" else
                 {int(x) for x in t.recompute_layers.split(",") if x.strip()})

    def full_layer(i: int) -> float:
        e = activation_elements(config, config.layer_types[i], config.ffn_types[i], t.expert_model_parallel_size)
        return (e["split"] / tp * tokens * low + e["tokens"] * token_share * low + e["fp32"] / tp * tokens * 4)

    def kept(i: int) -> float:  # a recomputed layer keeps only its input
        return config.hidden_size * token_share * low if recompute and i in recompute else full_layer(i)

    chunks = [layers_per_chunk[c * pp + rank] for c in range(vpp)]
    per_pass = max(sum(kept(i) for i in chunk) for chunk in chunks)
    if vpp > 1:  # megatron's interleaved 1F1B: warm-up passes of one chunk each, plus the current one
        in_flight = min(micro_batches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    else:  # 1F1B keeps pp - rank micro-batches in flight; without PP one at a time
        in_flight = min(micro_batches, pp - rank)
    total = in_flight * per_pass
    mine = [i for chunk in chunks for i in chunk]
    if recompute and any(i in recompute for i in mine):  # one recomputed layer's activations at a time
        total += max(full_layer(i) for i in mine if i in recompute)
    if rank == (pp * vpp - 1) % pp:  # LM head: logits and the fp32 softmax kept by the cross entropy
        total += tokens * config.vocab_size / tp * (low + 4) + 2 * config.hidden_size * token_share * low
    return total


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
        rank.activations = _activation_bytes(run, layers_per_chunk, rank.pipeline_rank, micro_batches,
                                             sequence_parallel)

    flops = model_flops_per_step(config, seq_length=t.seq_length)
    owner = {i: s % pp for s, chunk in enumerate(layers_per_chunk) for i in chunk}
    layers = [dict(index=i, mixer=config.layer_types[i], ffn=config.ffn_types[i], parameters=per_layer[i],
                   pipeline_rank=owner[i]) for i in range(config.num_layers)]
    layout = dict(world_size=world_size, tensor=tp, pipeline=pp, virtual_pipeline=vpp, expert=ep, context=cp,
                  data=dp, expert_data=expert_dp, sequence_parallel=sequence_parallel, micro_batches=micro_batches,
                  micro_batch_tokens=t.micro_batch_size * t.seq_length, seq_length=t.seq_length, bf16=t.bf16,
                  optimizer=t.optimizer,
                  distributed_optimizer=t.distributed_optimizer, recompute=t.recompute_layers or "none")
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
        f"PP {lay['pipeline']} x CP {lay['context']} x "
        f"DP {lay['data']} (EP {lay['expert']}, expert DP {lay['expert_data']}"
        + (f", virtual PP {lay['virtual_pipeline']}" if lay["virtual_pipeline"] > 1 else "")
        + f"); sequence parallel {'on' if lay['sequence_parallel'] else 'off'}; "
        f"{'bf16 + fp32 masters' if lay['bf16'] else 'fp32'}; {lay['optimizer']}"
        + (" (distributed optimizer)" if lay["distributed_optimizer"] else "")
        + f"; recompute {lay['recompute']}; {lay['micro_batches']} micro-batches of "
        f"{lay['micro_batch_tokens']:,} tokens",
        "memory per GPU, estimate in GiB (docs/training.md, \"Dry run and memory estimate\"):",
        "  pipeline rank  parameters        weights   grads  optimizer  activations   total",
    ]
    lines += [f"  {m.pipeline_rank:13d}  {m.parameters:>16,}  {m.weights / GIB:7.2f}  {m.grads / GIB:6.2f}  "
              f"{m.optimizer / GIB:9.2f}  {m.activations / GIB:11.2f}  {m.total / GIB:6.2f}" for m in report.memory]
    return "\n".join(lines)
