"""fused_recurrent_kda: decode-time recurrence (CPU fallback for now)."""
from kernels.kda.naive import recurrent_kda_reference


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, use_qk_l2norm=True, gate=None, inplace_state=False):
    o, final = recurrent_kda_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state or inplace_state,
                                       cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate=gate)
    if inplace_state and initial_state is not None:
        initial_state.copy_(final)
    return o, (final if output_final_state else None)
