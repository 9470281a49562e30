"""Communication volume of context parallelism (bytes one CP rank receives per layer and micro-batch),
and the causal-work imbalance of MLA under a contiguous partition.

The formulas of docs/parallelism.md, as code: the tests count the bytes the collectives really move
and compare them with these, and ``python -m parallel.context.volume`` prints the tables of the docs.
Convention: bytes that arrive at one rank from the other ranks (an all-gather of n bytes per rank:
(P-1) n; a reduce-scatter to n bytes per rank: (P-1) n; an all-to-all of an n-byte buffer:
(P-1)/P n; a point-to-point receive: its size), with ``b`` samples of ``L = S/P`` tokens per rank.
"""

from __future__ import annotations

import argparse

STATE_BYTES = 4  # the KDA state and its gradient travel in fp32


def chunkwise_kda_state(b, heads, dk, dv, P, any_continues=True) -> dict:
    """KDA state passing: forward all-gather of the [M | E] pairs (dk x (dk + dv) per head and sample),
    backward all-gather of the entering-state gradients (dk x dv). Independent of the length."""
    if P == 1 or not any_continues:
        return dict(forward=0, backward=0)
    return dict(forward=(P - 1) * b * heads * dk * (dk + dv) * STATE_BYTES,
                backward=(P - 1) * b * heads * dk * dv * STATE_BYTES)


def conv_halo(b, channels, width, element_size, rank, P, continues) -> dict:
    """The short conv's halo: W-1 rows of the q/k/v projections (``channels`` in all) from rank r-1
    (forward), their gradient from rank r+1 (backward); a pair of ranks talks only when the later
    slice of some sample continues a document (``continues`` [P, b], see ContextParallel)."""
    row = (width - 1) * b * channels * element_size
    receives = rank > 0 and bool(continues[rank].any())
    sends = rank + 1 < P and bool(continues[rank + 1].any())
    return dict(forward=row if receives else 0, backward=row if sends else 0)


def mla_latent(b, L, kv_lora_rank, rope, element_size, P, any_continues=True) -> dict:
    """MLA chunkwise: all-gather of the compressed keys, reduce-scatter of their gradient."""
    if P == 1 or not any_continues:
        return dict(forward=0, backward=0)
    n = (P - 1) * b * L * (kv_lora_rank + rope) * element_size
    return dict(forward=n, backward=n)


def ulysses(b, L, widths, element_size, P) -> dict:
    """All-to-alls of ``widths`` values per token (one tensor each, the output included); the backward
    moves the same tensors' gradients."""
    n = sum((P - 1) * b * L * width * element_size // P for width in widths)
    return dict(forward=n, backward=n)


def ulysses_kda_widths(heads, dk, dv, per_channel=True) -> list[int]:
    """q; k with the raw gate; v with beta's logit; the output."""
    return [heads * dk, heads * (dk + (dk if per_channel else 1)), heads * (dv + 1), heads * dv]


def ulysses_mla_widths(heads, nope, rope, v) -> list[int]:
    return [heads * (nope + rope), heads * (nope + rope), heads * v, heads * v]


def ring_attention(b, L, heads, dqk, dv, element_size, P) -> dict:
    """For comparison (not implemented here): ring attention passes every rank's expanded K and V
    around the ring (P-1 steps) and, in backward, K, V and their gradients."""
    n = (P - 1) * b * L * heads * (dqk + dv) * element_size
    return dict(forward=n, backward=2 * n)


def layer_bytes(kind: str, mode: str, config, cp, element_size: int) -> dict:
    """Bytes for one mixer layer of ``config`` (kind kda/gdn/mla, TP = 1 heads) on CP rank ``cp``."""
    b, L, P = cp.batch_size, cp.local_length, cp.size
    if kind in ("kda", "gdn"):
        heads, d = config.kda_num_heads, config.kda_head_dim
        if mode == "ulysses":
            return ulysses(b, L, ulysses_kda_widths(heads, d, d, kind == "kda"), element_size, P)
        state = chunkwise_kda_state(b, heads, d, d, P, cp.any_continues)
        halo = conv_halo(b, 3 * heads * d, config.short_conv_kernel, element_size, cp.rank, P, cp.continues)
        return {key: state[key] + halo[key] for key in state}
    if mode == "ulysses":
        widths = ulysses_mla_widths(config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                                    config.v_head_dim)
        return ulysses(b, L, widths, element_size, P)
    return mla_latent(b, L, config.kv_lora_rank, config.qk_rope_head_dim, element_size, P, cp.any_continues)


# ----------------------------------------------------------------------------- the docs' tables
def _mib(n):
    return f"{n / 2**20:,.2f}"


def table(preset: str, sizes=(2, 4, 8), lengths=(32768, 65536, 131072, 262144, 524288, 1048576),
          element_size=2) -> str:
    """Markdown: MiB received per rank and layer (forward + backward), one sample of T tokens, TP=1."""
    from model.presets import get_preset

    c = get_preset(preset)
    H, d = c.kda_num_heads, c.kda_head_dim
    rows = [f"| {preset}: T | CP | KDA chunkwise (state + halo) | KDA Ulysses | MLA latent all-gather | "
            f"MLA Ulysses | ring attention (MLA K/V) |", "|---|---|---|---|---|---|---|"]
    for T in lengths:
        for P in sizes:
            L = T // P
            both = lambda r: r["forward"] + r["backward"]
            state = both(chunkwise_kda_state(1, H, d, d, P))
            halo = 2 * (c.short_conv_kernel - 1) * 3 * H * d * element_size
            kda_u = both(ulysses(1, L, ulysses_kda_widths(H, d, d), element_size, P))
            mla = both(mla_latent(1, L, c.kv_lora_rank, c.qk_rope_head_dim, element_size, P))
            mla_u = both(ulysses(1, L, ulysses_mla_widths(c.num_attention_heads, c.qk_nope_head_dim,
                                                          c.qk_rope_head_dim, c.v_head_dim), element_size, P))
            ring = both(ring_attention(1, L, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim,
                                       c.v_head_dim, element_size, P))
            rows.append(f"| {T // 1024}k | {P} | {_mib(state + halo)} | {_mib(kda_u)} | {_mib(mla)} | {_mib(mla_u)} "
                        f"| {_mib(ring)} |")
    return "\n".join(rows)


def mla_imbalance_table(preset: str, sizes=(2, 4, 8), lengths=(32768, 131072, 1048576)) -> str:
    """Markdown: the slowest rank's step FLOPs over the balanced share, one document of T tokens.

    Under a contiguous partition rank r's queries meet r L + L/2 keys on average: the last rank does
    (2P - 1)/P times the mean attention work. With s the MLA attention's share of the model's FLOPs
    (model/flops.py), the step of the slowest rank costs 1 + s (P - 1)/P of a balanced one; the
    kv_b_proj expansion of the gathered latents adds (P - 1) L tokens' worth on the last rank."""
    from model.presets import get_preset
    from model.flops import forward_flops

    c = get_preset(preset)
    mla_layers = c.layer_types.count("mla")
    expand = 2 * c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)  # per token
    rows = [f"| {preset}: T | MLA attention share of FLOPs | " + " | ".join(f"CP={P}" for P in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for T in lengths:
        parts = forward_flops(c, [T])
        share = parts["mla_attention"] / parts["total"]
        cells = []
        for P in sizes:
            extra_expand = mla_layers * expand * (P - 1) / (parts["total"] / T)  # per local token, last rank
            cells.append(f"{1 + share * (P - 1) / P + extra_expand:.2f}x")
        rows.append(f"| {T // 1024}k | {share:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["kimi-linear-48b-a3b", "scaling-653m"])
    args = parser.parse_args()
    for preset in args.preset:
        print(table(preset), end="\n\n")
    for preset in args.preset:
        print(mla_imbalance_table(preset), end="\n\n")


if __name__ == "__main__":
    main()
