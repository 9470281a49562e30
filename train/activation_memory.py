"""Activation memory of one GPU at the peak of a training step: the part of the dry run's estimate
(``launch/pretrain.py --dry-run``) that grows with the sequence length. The model and its
assumptions: ``docs/training.md``, "Dry run and memory estimate".

Per layer, the mixer registry (``model/mixers.py``, keys ``ACTIVATION_KEYS``) gives what the layer
keeps for its backward per token, what its core op's backward allocates while it runs, and the terms
that only context parallelism has; this module adds the norms and the FFN and walks through the
backward of a micro-batch: the peak is the largest of

* the LM head's phase (last pipeline stage): every layer's kept tensors plus the logits and the
  cross entropy's fp32 softmax (``lm_head_bytes``: of all tokens, or of one chunk with
  ``train.loss_chunk_tokens``);
* each layer's backward: the kept tensors of the layers before it, the layer's full set (a
  recomputed layer has just rebuilt it) and its core op's backward buffers;

plus the kept tensors of the other micro-batches in flight (1F1B and interleaved pipelines).

Context parallelism (``P`` ranks, ``b`` samples of ``S`` tokens): every rank holds ``b S / P``
tokens. Under ``ulysses`` a rank holds whole samples of ``H / P`` heads inside the mixer, the same
number of elements, so nothing is added. Under ``chunkwise`` the ranks differ, and the estimate is the
larger of the first and the last CP rank (the terms grow or shrink linearly with the rank): CP rank
``r`` keeps, per MLA layer, the keys gathered from the earlier ranks (``r b S / P`` when one document
spans the sample), and per KDA/GDN layer the state transitions of the ``P - r - 1`` later ranks.
"""

from __future__ import annotations

from model import mixers

ZERO = dict.fromkeys(mixers.ACTIVATION_KEYS, 0.0)


def activation_elements(config, mixer: str, ffn: str, expert_parallel: int) -> dict[str, float]:
    """Elements of one layer (norms, mixer, FFN) by the keys of ``model.mixers.ACTIVATION_KEYS``."""
    d = config.hidden_size
    out = dict(ZERO, tokens=4.0 * d)  # two norms: input and output each
    entry = mixers.of_kind(mixer)
    for key, value in entry.activations(config).items():
        if key not in out:
            raise ValueError(f"mixer {entry.label}: its activations() returned {key!r}; the keys are "
                             f"model.mixers.ACTIVATION_KEYS: {', '.join(mixers.ACTIVATION_KEYS)}")
        out[key] += value
    if ffn == "dense":
        out["split"] += 3 * config.intermediate_size  # [gate; up] and the SwiGLU output
    else:
        k, width = config.num_experts_per_token, config.moe_intermediate_size
        # the routed experts keep [gate; up] and recompute the SwiGLU (model/grouped_experts.py);
        # the shared expert is megatron's MLP, which also keeps its output
        out["split"] += (2 * k + 3 * config.num_shared_experts) * width
        # the allgather dispatcher's gathered input; with EP > 1 (megatron's permutation) also the
        # routed copies of the input and output. With all experts local no routed copy is kept: the
        # experts gather their input again in backward and the combine keeps only its index
        out["tokens"] += (0 if expert_parallel == 1 else 2 * k * d) + expert_parallel * d
        out["fp32"] += config.num_experts  # router scores
    return out


def recomputed_layers(spec: str, num_layers: int) -> set[int]:
    """``train.recompute_layers``: "" none, "all", or layer indices "0,3,5"."""
    if not spec:
        return set()
    if spec == "all":
        return set(range(num_layers))
    return {int(x) for x in spec.split(",") if x.strip()}


def chunkwise(train) -> bool:
    return train.context_parallel_size > 1 and train.cp_mode == "chunkwise"


def gathered_keys(train, cp_rank: int | None = None) -> int:
    """Keys per micro-batch a gathering layer (MLA) holds from earlier context-parallel ranks on CP rank
    ``cp_rank`` (default: the last, the most loaded) under ``chunkwise``, one document spanning each
    sample; 0 otherwise."""
    cp = train.context_parallel_size
    if not chunkwise(train):
        return 0
    cp_rank = cp - 1 if cp_rank is None else cp_rank
    return train.micro_batch_size * train.seq_length // cp * cp_rank


def gathers_keys(config) -> bool:
    """Some mixer of the pattern keeps keys gathered from other context-parallel ranks."""
    return any(mixers.of_kind(kind).activations(config).get("keys_split", 0) for kind in set(config.layer_types))


def lm_head_bytes(config, train, tokens: int, sequence_parallel: bool) -> float:
    """Peak bytes of the LM head's phase beyond the layers' kept tensors, for ``tokens`` tokens of a
    micro-batch on this rank: the final norm's input and output, and

    * megatron's output layer + cross entropy: the logits and the fp32 softmax the cross entropy
      keeps, ``V/TP x (2 or 4 + 4)`` per token (its backward turns the softmax into the gradient);
    * the chunked head (``train.loss_chunk_tokens`` below the micro-batch's tokens; a micro-batch of
      at most one chunk takes megatron's path; model/lm_head_loss.py): one chunk's logits and
      their fp32 copy (one fp32 tensor in an fp32 run), the weight's fp32 gradient accumulator (with
      a bf16 weight also a bf16 weight gradient: a chunk's, then the result), the whole micro-batch's
      hidden gradient (and its all-gathered hidden states under sequence parallelism) and three fp32
      numbers per token (loss, maximum, sum of exp).
    """
    tp = train.tensor_model_parallel_size
    low = 2 if train.bf16 else 4
    d, vocab = config.hidden_size, config.vocab_size / tp
    norm = 2 * d * (tokens / tp if sequence_parallel else tokens) * low
    chunk = train.loss_chunk_tokens if train.loss_chunk_tokens < tokens else 0  # else megatron's path
    if not chunk:
        return norm + tokens * vocab * (low + 4)
    cast = low if low < 4 else 0  # an fp32 run's casts to fp32 are no copies
    weight_grad = vocab * d * (4 + cast)
    hidden = (2 if sequence_parallel and tp > 1 else 1) * tokens * d * low
    return norm + chunk * vocab * (cast + 4) + weight_grad + hidden + 12 * tokens


def activation_bytes(run, layers_per_chunk: list[list[int]], rank: int, micro_batches: int,
                     sequence_parallel: bool, cp_rank: int | None = None) -> float:
    """Peak activation bytes on one GPU of pipeline rank ``rank`` and context-parallel rank ``cp_rank``
    (default: the larger of the first and the last)."""
    t = run.train
    if cp_rank is None:
        return max(activation_bytes(run, layers_per_chunk, rank, micro_batches, sequence_parallel, r)
                   for r in {0, t.context_parallel_size - 1})
    config = run.model
    tp, pp, cp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size
    vpp = max(t.virtual_pipeline_model_parallel_size, 1)
    samples = t.micro_batch_size
    tokens = samples * t.seq_length // cp  # this rank's slice under CP
    keys = gathered_keys(t, cp_rank)
    later = cp - cp_rank - 1 if chunkwise(t) else 0  # ranks whose state transitions this one keeps
    exchanged = cp if chunkwise(t) else 0  # state pairs all-gathered while a layer runs
    low = 2 if t.bf16 else 4
    token_share = tokens / tp if sequence_parallel else tokens
    recompute = recomputed_layers(t.recompute_layers, config.num_layers)
    elements = {}

    def layer(i: int) -> dict[str, float]:
        if i not in elements:
            elements[i] = activation_elements(config, config.layer_types[i], config.ffn_types[i],
                                              t.expert_model_parallel_size)
        return elements[i]

    def full(i: int) -> float:  # everything layer i keeps for its backward
        e = layer(i)
        return (e["split"] / tp * tokens * low + e["tokens"] * token_share * low + e["fp32"] / tp * tokens * 4
                + e["keys_split"] / tp * keys * low + e["keys_tokens"] * keys * low  # whole on every TP rank
                + e["cp_state_fp32"] / tp * samples * later * 4)

    def kept(i: int) -> float:  # a recomputed layer keeps only its input
        return config.hidden_size * token_share * low if i in recompute else full(i)

    def backward_buffers(i: int) -> float:
        e = layer(i)
        return (e["backward_split"] / tp * tokens * low + e["backward_fp32"] / tp * tokens * 4
                + e["keys_backward_split"] / tp * keys * low + e["keys_backward_tokens"] * keys * low
                + e["cp_exchange_fp32"] / tp * samples * exchanged * 4)

    head_rank = (pp * vpp - 1) % pp
    head = lm_head_bytes(config, t, tokens, sequence_parallel) if rank == head_rank else 0.0

    chunks = [layers_per_chunk[c * pp + rank] for c in range(vpp)]
    kept_per_pass = [sum(kept(i) for i in chunk) for chunk in chunks]
    peaks = []
    for c, chunk in enumerate(chunks):
        before, peak = 0.0, 0.0
        for i in chunk:  # layer i's backward: the layers before it still hold what they kept
            peak = max(peak, before + full(i) + backward_buffers(i))
            before += kept(i)
        if rank == head_rank and c == vpp - 1:
            peak = max(peak, before + head)
        peaks.append(peak)
    if vpp > 1:  # megatron's interleaved 1F1B: warm-up passes of one chunk each, plus the current one
        in_flight = min(micro_batches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    else:  # 1F1B keeps pp - rank micro-batches in flight; without PP one at a time
        in_flight = min(micro_batches, pp - rank)
    return (in_flight - 1) * max(kept_per_pass) + max(peaks)
