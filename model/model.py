"""The hybrid language model: embedding, pre-norm residual blocks, final norm, untied LM head.

Block i: ``h = h + Mixer_i(RMSNorm(h)); h = h + FFN_i(RMSNorm(h))`` with the mixer chosen by the
layer pattern (KDA, GDN, MLA or another mixer of model/mixers.py) and the FFN dense for the first
``first_k_dense`` layers, MoE after.
Inside the model a micro-batch ``[B, S]`` travels as one packed stream ``[B*S, 1, hidden]``
(sequence first, as megatron-core expects), with document boundaries from ``cu_seqlens``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from torch import nn

from . import mixers, tp
from .config import ModelConfig
from .ffn import check_renormalize, dense_mlp, drop_graph_references, megatron_config, moe_layer
from .lm_head_loss import chunked_lm_head_loss
from .norms import RMSNorm
from .packed import PackedSequence, pack
from .profiling import profiled


class DecoderLayer(MegatronModule):
    def __init__(self, config: ModelConfig, tconfig, layer_idx: int):
        super().__init__(config=tconfig)
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.ffn_type = config.ffn_types[layer_idx]
        sp = bool(tconfig.sequence_parallel)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, sp)
        self.mixer = mixers.of_kind(self.layer_type).build(config, tconfig, layer_idx)
        self.post_mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, sp)
        self.ffn = dense_mlp(tconfig) if self.ffn_type == "dense" else moe_layer(tconfig, layer_idx + 1)

    recompute = False  # activation recompute: keep only the layer input, redo the layer in backward

    def _block(self, hidden: torch.Tensor, packed: PackedSequence, context_parallel=None) -> torch.Tensor:
        mixer_kwargs = {} if context_parallel is None else {"context_parallel": context_parallel}
        hidden = hidden + profiled("mixer", self.mixer, self.input_norm(hidden), packed, **mixer_kwargs)
        try:
            out = profiled("moe" if self.ffn_type == "moe" else "dense_mlp", self.ffn, self.post_mixer_norm(hidden))
        finally:  # also when the checkpoint stops a recompute early, by raising inside the MoE layer
            if self.ffn_type == "moe":
                drop_graph_references(self.ffn)
        out = out[0] if isinstance(out, tuple) else out
        return hidden + out

    def forward(self, hidden: torch.Tensor, packed: PackedSequence, context_parallel=None) -> torch.Tensor:
        """``context_parallel``: the ``parallel.context.ContextParallel`` of this rank's slice (the
        mixers exchange what crosses slice boundaries; everything else is per token)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            # re-running the router in backward counts its tokens twice; the expert-bias update
            # uses only the sign of (mean load - load), which doubling does not change. Under
            # context parallelism the recompute repeats the mixer's exchange (every CP rank alike)
            return torch.utils.checkpoint.checkpoint(self._block, hidden, packed, context_parallel,
                                                     use_reentrant=False)
        return self._block(hidden, packed, context_parallel)


class LayerStack(nn.ModuleDict):
    """The decoder layers of this pipeline stage, keyed by their global index (so checkpoints and
    HF names are the same at every pipeline layout). Indexing and iteration give the layers."""

    def __getitem__(self, index):
        return super().__getitem__(str(index))

    def __iter__(self):
        return iter(self._modules.values())


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Contiguous layers of pipeline stage ``stage``; earlier stages take the remainder."""
    if num_layers < stages:
        raise ValueError(f"num_layers={num_layers} cannot be split over {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class KimiLinearModel(MegatronModule):
    """Call with token ids ``[B, S]`` (a tensor or nested lists; ``cu_seqlens`` for packed documents).

    Returns logits ``[B, S, vocab]`` (gathered over TP) or, given ``labels``, the per-token loss
    ``[B, S]`` computed with megatron's vocab-parallel cross entropy (with ``loss_chunk_tokens`` set: the
    same losses from model/lm_head_loss.py, never holding the whole micro-batch's logits). Under
    context parallelism the tokens are this rank's slice ``[B, S / CP]`` with its local ``cu_seqlens``, and
    ``context_parallel`` is the slice's ``parallel.context.ContextParallel`` (train/context.py).
    A pipeline stage holds ``layer_range`` only; the first has the embedding, the last the final
    norm and LM head, and a later stage takes its input from ``set_input_tensor`` (megatron's
    pipeline schedules).
    """

    def __init__(self, config: ModelConfig, tconfig=None, pre_process: bool = True, post_process: bool = True,
                 layer_range: range | None = None):
        tconfig = tconfig or megatron_config(config)
        super().__init__(config=tconfig)
        config.validate(tensor_parallel_size=tp.tp_size())
        check_renormalize(config)
        self.model_config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        self.loss_chunk_tokens = 0  # > 0: the LM head's loss this many tokens at a time (set_loss_chunk_tokens)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # read by megatron's interleaved schedule
        self.sequence_parallel = bool(tconfig.sequence_parallel)
        if pre_process:
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, init_method=tp.deferred_init, config=tconfig,
                reduce_scatter_embeddings=self.sequence_parallel,
            )
        layer_range = layer_range if layer_range is not None else range(config.num_layers)
        self.layers = LayerStack({str(i): DecoderLayer(config, tconfig, i) for i in layer_range})
        if post_process:
            self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.sequence_parallel)
            self.output_layer = tp.column(config.hidden_size, config.vocab_size, tconfig)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a non-first stage its input activations here."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def forward(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        context_parallel=None,
    ) -> torch.Tensor:
        if not torch.is_tensor(tokens):  # lists of token ids (the README snippet)
            tokens = torch.tensor(tokens, dtype=torch.long, device=self.embedding.weight.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        batch, seq = tokens.shape
        packed = pack(batch, seq, cu_seqlens, tokens.device)
        if self.sequence_parallel and packed.num_tokens % tp.tp_size():
            raise ValueError(
                f"sequence parallelism splits the {packed.num_tokens} tokens of a micro-batch over "
                f"{tp.tp_size()} TP ranks; make micro_batch_size x seq_length divisible by it"
            )
        if self.pre_process:
            # [B*S, 1, hidden]; with SP megatron's embedding takes [b, s] and reduce-scatters [s, b, h]
            ids = tokens.reshape(1, -1) if self.sequence_parallel else tokens.reshape(-1, 1)
            hidden = self.embedding(ids)
        else:
            hidden = self.input_tensor
        for layer in self.layers:
            hidden = layer(hidden, packed, context_parallel)
        if not self.post_process:
            return hidden
        hidden = self.final_norm(hidden)
        # a micro-batch of at most one chunk takes megatron's path: the same numbers, less memory
        if labels is not None and 0 < self.loss_chunk_tokens < packed.num_tokens:
            loss = chunked_lm_head_loss(hidden, self.output_layer.weight, labels, self.loss_chunk_tokens,
                                        self.sequence_parallel)
            return loss.view(batch, seq)
        logits = self.output_layer(hidden)[0]  # [B*S, 1, vocab / TP]
        if labels is not None:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.reshape(-1, 1))
            return loss.view(batch, seq)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits.view(batch, seq, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return tp.sharded_state_dict_with_axes(self, prefix, {}, sharded_offsets, metadata)


class ModelChunks(nn.Module):
    """The model chunks of one pipeline rank under virtual pipeline stages (interleaved 1F1B).

    Chunk c of rank r is virtual stage ``c * PP + r``. Parameters, ``layers`` and the sharded state
    dict span all chunks; layer keys are global, so checkpoints are the same as without chunks.
    """

    def __init__(self, chunks: list[KimiLinearModel]):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.config = chunks[0].config
        self.model_config = chunks[0].model_config

    @property
    def layers(self) -> dict:
        return {index: layer for chunk in self.chunks for index, layer in chunk.layers.items()}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        merged = {}
        for chunk in self.chunks:
            merged.update(chunk.sharded_state_dict(prefix, sharded_offsets, metadata))
        return merged

    def load_state_dict(self, state_dict, strict: bool = True):
        missing, unexpected = [], set(state_dict)
        for chunk in self.chunks:
            own = set(chunk.state_dict())
            result = chunk.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
            missing += list(result.missing_keys)
            unexpected -= own
        return torch.nn.modules.module._IncompatibleKeys(missing, sorted(unexpected))


def build_model(config: ModelConfig, sequence_parallel: bool | None = None, seed: int | None = None,
                initialize_weights: bool = True, **megatron_kwargs):
    """Build this rank's model for the current parallel state (call parallel.state.initialize first):
    a KimiLinearModel, or ModelChunks under virtual pipeline stages.

    Its weights are initialised from ``seed`` (default: the seed given to parallel.state.initialize)
    layout-invariantly (model/init.py): every layout, device and arm of the comparison starts from
    the same values. ``initialize_weights=False`` leaves them uninitialised, for weights loaded next.

    Sequence parallelism defaults to on whenever TP > 1 and the model has MoE layers: megatron's
    MoE layer refuses to train with TP but without SP.
    """
    from megatron.core import parallel_state

    from parallel import state

    from .init import initialize_model

    size = tp.tp_size()
    if sequence_parallel is None:
        sequence_parallel = size > 1 and "moe" in config.ffn_types
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    tconfig = megatron_config(config, tensor_parallel=size, sequence_parallel=sequence_parallel and size > 1,
                              pipeline_parallel=stages, **megatron_kwargs)
    if virtual > 1:
        tconfig.virtual_pipeline_model_parallel_size = virtual
    chunks = []
    for chunk in range(virtual):
        stage = chunk * stages + rank
        model = KimiLinearModel(config, tconfig, pre_process=stage == 0, post_process=stage == stages * virtual - 1,
                                layer_range=stage_layers(config.num_layers, stages * virtual, stage))
        model.vp_stage = chunk if virtual > 1 else None
        chunks.append(model)
    model = chunks[0] if virtual == 1 else ModelChunks(chunks)
    if initialize_weights:
        initialize_model(model, config, state.initial_seed() if seed is None else seed)
    return model


def set_loss_chunk_tokens(model: nn.Module, chunk_tokens: int) -> None:
    """Compute the training loss ``chunk_tokens`` tokens at a time in every model chunk holding the LM
    head (model/lm_head_loss.py); 0 keeps megatron's output layer and cross entropy over all tokens."""
    if chunk_tokens < 0:
        raise ValueError(f"loss chunk of {chunk_tokens} tokens: must be >= 0 (0 = off)")
    for chunk in getattr(model, "chunks", [model]):
        head = getattr(chunk, "output_layer", None)
        if chunk_tokens and head is not None and head.gradient_accumulation_fusion:
            # that fusion adds the weight's gradient into main_grad inside megatron's layer; ours returns it
            raise ValueError("the chunked LM head loss needs gradient_accumulation_fusion=False in the megatron config")
        chunk.loss_chunk_tokens = chunk_tokens


def count_parameters(model: nn.Module) -> int:
    """Parameters plus the router expert-bias buffers (HF stores them as tensors too)."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith("expert_bias"))
    return params + buffers
