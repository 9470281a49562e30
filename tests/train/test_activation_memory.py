"""The dry run's activation model (train/activation_memory.py) and the longest-sequence search
(``--dry-run --find-max-seq-length``): how the estimate scales with the sequence, context
parallelism and its modes, and that the search is monotonic and stays within its budget.
The estimate against measured GPU peaks: benchmarks/memory_model.py."""

import dataclasses

import pytest

from model import mixers
from train.activation_memory import activation_elements
from train.config import load_run_config
from train.errors import ConfigError

GIB = 2.0**30


def _run(preset="scaling-653m", seq=4096, **train):
    run = load_run_config(preset)
    run.train.seq_length, run.train.micro_batch_size, run.train.global_batch_size = seq, 1, 8
    for key, value in train.items():
        setattr(run.train, key, value)
    return run


def _activations(run, world_size=None) -> float:
    from train.dry_run import dry_run

    return max(m.activations for m in dry_run(run, world_size).memory)


def _kda_only(run):
    run.model = dataclasses.replace(run.model, layer_pattern="K")
    return run


@pytest.mark.parametrize("recompute", ["", "all"])
def test_doubling_the_sequence_doubles_the_activations(recompute):
    one, two = (_activations(_run(seq=s, recompute_layers=recompute)) for s in (4096, 8192))
    assert two == pytest.approx(2 * one, rel=1e-12)


@pytest.mark.parametrize("mode", ["ulysses", "chunkwise"])
def test_context_parallel_halves_the_per_rank_slope(mode):
    """CP = 2 halves the part that grows with the sequence; ulysses adds nothing else, chunkwise adds
    per-sample state terms (KDA's transitions and exchange buffers) that do not grow with it."""
    def act(seq, cp):
        return _activations(_kda_only(_run(seq=seq, context_parallel_size=cp, cp_mode=mode)), world_size=2)

    slope_1 = (act(8192, 1) - act(4096, 1)) / 4096
    slope_2 = (act(8192, 2) - act(4096, 2)) / 4096
    assert slope_2 == pytest.approx(slope_1 / 2, rel=1e-12)
    offset = act(8192, 2) - act(8192, 1) / 2
    if mode == "ulysses":
        assert offset == pytest.approx(0, abs=1e-6 * act(8192, 1))
    else:  # at most every layer's kept transitions plus one layer's gathered pairs, fp32
        config = _kda_only(_run()).model
        e = activation_elements(config, "kda", "moe", 1)
        assert 0 < offset <= (config.num_layers * e["cp_state_fp32"] + 2 * e["cp_exchange_fp32"]) * 4


def test_chunkwise_mla_keeps_the_gathered_keys_on_the_last_rank():
    """Under chunkwise the last CP rank's MLA layers hold every earlier rank's keys (one document
    spanning the sample), so its activations grow faster with the sequence than ulysses' (which hold
    nothing extra), by at least what every MLA layer registers per key times the gathered count
    (without recompute, every layer's set is kept when the LM head runs)."""
    def act(seq, mode):
        return _activations(_run(seq=seq, context_parallel_size=4, cp_mode=mode), 4)

    extra = [act(s, "chunkwise") - act(s, "ulysses") for s in (4096, 8192)]
    run = _run()
    keys = mixers.of_kind("mla").activations(run.model)
    per_key = (keys["keys_split"] + keys["keys_tokens"]) * (2 if run.train.bf16 else 4)
    gathered = [3 * s // 4 for s in (4096, 8192)]
    assert extra[1] > extra[0] > 0
    assert extra[1] - extra[0] >= run.model.layer_types.count("mla") * per_key * (gathered[1] - gathered[0])


def test_the_search_finds_the_longest_fitting_sequence_and_is_monotonic():
    from train.dry_run import GIB, find_max_seq_length, usable_bytes

    run = _run(recompute_layers="all")
    fits = [find_max_seq_length(run, device_memory_gib=memory) for memory in (80, 100, 139.8)]
    for fit, memory in zip(fits, (80, 100, 139.8)):
        assert fit.budget == usable_bytes(memory) and fit.seq_length % fit.step == 0
        assert 0 < fit.seq_length and fit.peak <= fit.budget < fit.next_peak
    assert fits[0].seq_length < fits[1].seq_length < fits[2].seq_length
    cp2 = find_max_seq_length(_run(recompute_layers="all", context_parallel_size=2, cp_mode="ulysses",
                                   distributed_optimizer=True), world_size=2, device_memory_gib=100)
    dp2 = find_max_seq_length(_run(recompute_layers="all", distributed_optimizer=True), world_size=2,
                              device_memory_gib=100)
    assert cp2.step == 2048 and cp2.seq_length >= 2 * dp2.seq_length - cp2.step
    assert find_max_seq_length(run, device_memory_gib=20).seq_length == 0  # the weights alone do not fit
    assert fits[0].budget / GIB < 80


def test_the_search_refuses_bad_budgets_and_steps():
    from train.dry_run import find_max_seq_length

    with pytest.raises(ConfigError, match="--device-memory-gib=1.5: must be more than"):
        find_max_seq_length(_run(), device_memory_gib=1.5)
    with pytest.raises(ConfigError, match="step 1000: must be a positive multiple of --context-parallel-size 3"):
        find_max_seq_length(_run(seq=3000, context_parallel_size=3), world_size=3, step=1000)


def test_dry_run_cli_prints_the_longest_sequences(capsys):
    from launch.pretrain import main

    assert main(["--config", "tiny", "--dry-run", "--find-max-seq-length", "--context-parallel-size", "2",
                 "--world-size", "2", "--device-memory-gib", "4", "--micro-batch-size", "1",
                 "--global-batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "layout: 2 GPUs = TP 1 x PP 1 x CP 2 (chunkwise) x DP 1" in out
    assert "longest sequence whose estimate fits 1.9 GiB per GPU" in out
    lines = [line for line in out.splitlines() if line.startswith("  recompute ")]
    assert [line.split(":")[0].strip() for line in lines] == [
        "recompute none", "recompute all", "recompute all, loss in chunks of 4,096 tokens"]
    lengths = [int(line.split(": ")[1].split(" tokens")[0].replace(",", "")) for line in lines]
    assert 0 < lengths[0] < lengths[1] < lengths[2] and all(n % 2048 == 0 for n in lengths)


def test_the_chunked_loss_holds_one_chunk_of_logits():
    """With ``train.loss_chunk_tokens`` the LM head's phase holds one chunk's logits (bf16 + fp32
    copy) instead of the micro-batch's: each token more in the chunk costs ``V/TP x 6`` bytes, a
    chunk of the whole micro-batch or longer is megatron's path, and the rest grows with the tokens
    by the hidden gradient and three fp32 numbers only."""
    from train.activation_memory import lm_head_bytes

    run = _run(seq=32768, bf16=True)
    config, vocab = run.model, run.model.vocab_size

    def head(chunk, tokens=32768, **train):
        return lm_head_bytes(config, dataclasses.replace(run.train, loss_chunk_tokens=chunk, **train), tokens, False)

    assert head(0) == 2 * config.hidden_size * 32768 * 2 + 32768 * vocab * 6
    assert head(4097) - head(4096) == vocab * 6
    assert head(10**6) == head(32768) == head(0) and head(4096) < head(0) / 4
    assert head(4096, 65536) - head(4096) == 32768 * (2 * config.hidden_size * 2 + config.hidden_size * 2 + 12)
    tp2 = head(4097, tensor_model_parallel_size=2) - head(4096, tensor_model_parallel_size=2)
    assert tp2 == vocab / 2 * 6


def test_the_chunked_loss_lengthens_the_longest_recomputed_context():
    """Kimi Linear 48B on 16 GPUs (EP 16, distributed optimizer): recomputing every layer, the logits
    (V = 163,840) bound the length; chunking them lets a layer's backward bound it instead (the
    table in docs/parallelism.md). Without recompute the layers' kept sets dominate either way."""
    from train.dry_run import find_max_seq_length

    def fit(**train):
        run = _run("kimi-linear-48b-a3b", bf16=True, distributed_optimizer=True, expert_model_parallel_size=16,
                   global_batch_size=16, **train)
        return find_max_seq_length(run, world_size=16)

    plain, chunked = fit(recompute_layers="all"), fit(recompute_layers="all", loss_chunk_tokens=4096)
    assert chunked.loss_chunk_tokens == 4096 and plain.loss_chunk_tokens == 0
    assert chunked.seq_length > 1.3 * plain.seq_length > 0
    none_plain, none_chunked = fit(), fit(loss_chunk_tokens=4096)
    assert abs(none_chunked.seq_length - none_plain.seq_length) < 0.2 * none_plain.seq_length


@pytest.mark.parametrize("argv,message", [
    (["--find-max-seq-length"], "--find-max-seq-length and --device-memory-gib belong to --dry-run"),
    (["--dry-run", "--device-memory-gib", "80"], "--device-memory-gib is the budget of --find-max-seq-length"),
    (["--dry-run", "--find-max-seq-length", "--device-memory-gib", "0"], "--device-memory-gib=0.0: must be more"),
])
def test_dry_run_cli_refuses_bad_search_flags(capsys, argv, message):
    from launch.pretrain import main

    assert main(["--config", "tiny"] + argv) == 2
    assert message in capsys.readouterr().err


def test_a_registered_mixer_brings_its_own_terms():
    """The estimate reads the registry: a new mixer's terms (gathered keys included) enter it with no
    change elsewhere, and an unknown key is refused with the list of known ones."""
    from train.activation_memory import gathers_keys

    mla = mixers.of_kind("mla")
    terms = {"split": 10.0, "keys_split": 3.0}
    toy = mixers.register(dataclasses.replace(mla, symbol="Z", kind="zmla", hf=None, arm=None,
                                              activations=lambda config: dict(terms)))
    try:
        config = dataclasses.replace(_run().model, layer_pattern="KZ")
        assert gathers_keys(config)
        dense = activation_elements(config, "zmla", "dense", 1)
        assert dense["split"] == 10 + 3 * config.intermediate_size and dense["keys_split"] == 3
        assert not gathers_keys(dataclasses.replace(config, layer_pattern="K"))
        terms["keys_splt"] = 1.0
        with pytest.raises(ValueError, match="'keys_splt'; the keys are model.mixers.ACTIVATION_KEYS"):
            activation_elements(config, "zmla", "dense", 1)
    finally:
        mixers.unregister(toy.symbol)
