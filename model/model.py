"""The hybrid language model: embedding, pre-norm residual blocks, final norm, untied LM head.

Block i: ``h = h + Mixer_i(RMSNorm(h)); h = h + FFN_i(RMSNorm(h))`` with the mixer chosen by the
layer pattern (KDA, GDN or MLA) and the FFN dense for the first ``first_k_dense`` layers, MoE after.
Inside the model a micro-batch ``[B, S]`` travels as one packed stream ``[B*S, 1, hidden]``
(sequence first, as megatron-core expects), with document boundaries from ``cu_seqlens``.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from torch import nn

from . import tp
from .config import ModelConfig
from .ffn import check_renormalize, dense_mlp, megatron_config, moe_layer
from .kda import KimiDeltaAttention
from .mla import MultiLatentAttention
from .norms import RMSNorm
from .packed import PackedSequence, pack


class DecoderLayer(MegatronModule):
    def __init__(self, config: ModelConfig, tconfig, layer_idx: int):
        super().__init__(config=tconfig)
        self.layer_type = config.layer_types[layer_idx]
        self.ffn_type = config.ffn_types[layer_idx]
        sp = bool(tconfig.sequence_parallel)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, sp)
        if self.layer_type == "mla":
            self.mixer = MultiLatentAttention(config, tconfig, layer_idx)
        else:
            self.mixer = KimiDeltaAttention(config, tconfig, layer_idx, per_channel_decay=self.layer_type == "kda")
        self.post_mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, sp)
        self.ffn = dense_mlp(tconfig) if self.ffn_type == "dense" else moe_layer(tconfig, layer_idx + 1)

    def forward(self, hidden: torch.Tensor, packed: PackedSequence) -> torch.Tensor:
        hidden = hidden + self.mixer(self.input_norm(hidden), packed)
        out = self.ffn(self.post_mixer_norm(hidden))
        out = out[0] if isinstance(out, tuple) else out
        return hidden + out


class KimiLinearModel(MegatronModule):
    """Call with token ids ``[B, S]`` (a tensor or nested lists; ``cu_seqlens`` for packed documents).

    Returns logits ``[B, S, vocab]`` (gathered over TP) or, given ``labels``, the per-token loss
    ``[B, S]`` computed with megatron's vocab-parallel cross entropy.
    """

    def __init__(self, config: ModelConfig, tconfig=None):
        tconfig = tconfig or megatron_config(config)
        super().__init__(config=tconfig)
        config.validate(tensor_parallel_size=tp.tp_size())
        check_renormalize(config)
        self.model_config = config
        std = config.initializer_range
        self.sequence_parallel = bool(tconfig.sequence_parallel)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=tp.normal_init(std), config=tconfig,
            reduce_scatter_embeddings=self.sequence_parallel,
        )
        self.layers = nn.ModuleList(DecoderLayer(config, tconfig, i) for i in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.sequence_parallel)
        self.output_layer = tp.column(config.hidden_size, config.vocab_size, tconfig, std)

    def forward(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
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
        # [B*S, 1, hidden]; with SP megatron's embedding takes [b, s] and reduce-scatters [s, b, h]
        ids = tokens.reshape(1, -1) if self.sequence_parallel else tokens.reshape(-1, 1)
        hidden = self.embedding(ids)
        for layer in self.layers:
            hidden = layer(hidden, packed)
        hidden = self.final_norm(hidden)
        logits = self.output_layer(hidden)[0]  # [B*S, 1, vocab / TP]
        if labels is not None:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.reshape(-1, 1))
            return loss.view(batch, seq)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits.view(batch, seq, -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return tp.sharded_state_dict_with_axes(self, prefix, {}, sharded_offsets, metadata)


def build_model(config: ModelConfig, sequence_parallel: bool | None = None, **megatron_kwargs) -> KimiLinearModel:
    """Build the model for the current parallel state (call parallel.state.initialize first).

    Sequence parallelism defaults to on whenever TP > 1 and the model has MoE layers: megatron's
    MoE layer refuses to train with TP but without SP.
    """
    size = tp.tp_size()
    if sequence_parallel is None:
        sequence_parallel = size > 1 and "moe" in config.ffn_types
    tconfig = megatron_config(config, tensor_parallel=size, sequence_parallel=sequence_parallel and size > 1,
                              **megatron_kwargs)
    return KimiLinearModel(config, tconfig)


def count_parameters(model: nn.Module) -> int:
    """Parameters plus the router expert-bias buffers (HF stores them as tensors too)."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith("expert_bias"))
    return params + buffers
