"""Run configuration: model + training + parallel layout, from a preset name or a JSON file,
with command-line overrides for any field.

``--config tiny`` takes the model preset ``tiny`` and the training defaults below.
``--config run.json`` reads ``{"model": {...} or "preset": NAME, "train": {...}}``; a file that names a
preset starts from exactly what ``--config NAME`` gives (the preset's model and training defaults)
and changes only the fields it lists. ``configs/`` holds the recipes of the paper's comparison.
``--set train.lr=3e-4 --set model.layer_pattern=GGGA`` (or a bare field name when it is unique)
overrides any field; the common ones also have Megatron-LM-style flags (``--train-iters`` ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ConfigError, ModelConfig, coerce_field
from model.presets import PRESETS, get_preset


@dataclass
class TrainConfig:
    # data
    data_prefixes: list = field(default_factory=list)  # indexed .bin/.idx prefixes; empty = embedded corpus
    data_weights: list = field(default_factory=list)  # blending weights, one per prefix
    valid_prefixes: list = field(default_factory=list)
    tokenizer_dir: str = ""
    data_cache_dir: str = "cache/data"
    seq_length: int = 128
    reset_at_document_boundaries: bool = True
    # batch
    micro_batch_size: int = 2
    global_batch_size: int = 4  # in sequences
    global_batch_tokens: int = 0  # if set: the global batch in tokens (global_batch_size = this / seq_length)
    # optimisation
    train_iters: int = 200
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices + AdamW for the rest)
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_schedule: str = "wsd"  # wsd | cosine | constant
    lr_warmup_iters: int = 20
    lr_decay_fraction: float = 0.2  # WSD: share of the run spent decaying
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    qk_clip_tau: float = 100.0  # MuonClip's QK-Clip threshold for MLA (Muon only); 0 = off
    seed: int = 1234
    bf16: bool = False  # bf16 weights and compute, fp32 master weights and optimizer state
    distributed_optimizer: bool = False  # megatron DDP + ZeRO-1 optimizer (AdamW; state sharded over DP)
    recompute_layers: str = ""  # activation recompute: "" none, "all", or layer indices "0,3,5"
    # the LM head's loss this many tokens at a time, never holding all logits of a micro-batch
    # (model/lm_head_loss.py; docs/training.md, "Chunked LM head and loss"); 0 = off
    loss_chunk_tokens: int = 0
    compile: bool = False  # fuse the norms with torch.compile (CUDA; model/fusion.py)
    max_nonfinite_steps: int = 5  # stop after this many consecutive skipped (non-finite) steps
    # Python's garbage collector runs only every this many steps (young generations), not whenever
    # it decides to: a full pass over the many objects of a compiled model stalls the step it lands
    # in (as torchtitan and Megatron-LM also schedule it); 0 = Python's automatic collector
    gc_interval: int = 50
    # parallel layout
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    cp_mode: str = "chunkwise"  # context parallelism: chunkwise (KDA state passing, MLA latent all-gather) | ulysses
    sequence_parallel: bool = False
    # checkpoints and logging
    save: str = ""
    load: str = ""
    save_interval: int = 100
    exit_interval: int = 0  # stop (after saving) once the step is a multiple of this; 0 = never
    keep_last: int = 3
    # a start older than checkpoints in --save: move those to SAVE/discarded/ (default: refuse to start)
    discard_newer_checkpoints: bool = False
    log_interval: int = 1
    eval_interval: int = 0
    eval_iters: int = 4
    # with the validation: the loss on whole validation documents of at least this many tokens
    # (valid_long/*; docs/training.md, "Long-document validation"); 0 = off
    eval_long_min_length: int = 0
    eval_long_max_tokens: int = 0  # predict at most this many tokens of them per evaluation; 0 = all
    run_dir: str = ""
    metrics_interval: int = 10  # MoE load balance and KDA gate statistics every N steps; 0 = never
    profile_step: int = 0  # profile this step (1-based) and write the time per part (train/profile.py); 0 = off
    peak_flops_per_gpu: float = 0.0  # for MFU; 0 = detect from the GPU name
    wandb_project: str = ""  # empty: no Weights & Biases (metrics.jsonl only)
    wandb_mode: str = ""  # empty: $WANDB_MODE, else offline
    wandb_entity: str = ""
    wandb_run_name: str = ""

    def validate(self) -> "TrainConfig":
        self._check_numbers()
        if self.global_batch_tokens:
            if self.global_batch_tokens % self.seq_length:
                raise ConfigError(
                    f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                    f"train.seq_length={self.seq_length}"
                )
            self.global_batch_size = self.global_batch_tokens // self.seq_length
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer={self.optimizer!r}: use adamw or muon")
        if self.lr_schedule not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}: use wsd, cosine or constant")
        if self.eval_long_min_length and not self.eval_interval:
            raise ConfigError(
                f"--eval-long-min-length={self.eval_long_min_length} needs --eval-interval N (or --set "
                "train.eval_interval=N): the long-document validation runs with the validation"
            )
        if self.data_weights and len(self.data_weights) != len(self.data_prefixes):
            raise ConfigError(
                f"train.data_weights has {len(self.data_weights)} entries but train.data_prefixes has "
                f"{len(self.data_prefixes)}; give one weight per prefix"
            )
        return self

    def _check_numbers(self) -> None:
        """Every numeric field within its range, with a message naming the flag."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{_flag(f.name)}={value!r}: must be a number")
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"{_flag(f.name)}={value!r}: must be a finite number")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"{_flag(f.name)}={value!r}: must be a whole number")
            rule = NUMBER_RULES.get(f.name)
            if rule is not None and not rule[0](value):
                raise ConfigError(f"{_flag(f.name)}={value!r}: must be {rule[1]}")
        if self.min_lr > self.lr:
            raise ConfigError(
                f"--min-lr={self.min_lr!r} exceeds --lr={self.lr!r}: the schedule decays from lr to min_lr"
            )
        for weight in self.data_weights:
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not number or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"--data-path weight {weight!r}: blending weights must be finite and >= 0")
        if self.data_weights and not sum(self.data_weights) > 0:
            raise ConfigError(f"--data-path weights {self.data_weights}: at least one must be positive")


def _positive(v) -> bool:
    return v > 0


def _at_least(low):
    return lambda v: v >= low


def _fraction(v) -> bool:
    return 0 <= v < 1


# (check, what it must be) for every numeric TrainConfig field
NUMBER_RULES = {
    "seq_length": (_positive, "positive"),
    "micro_batch_size": (_positive, "positive"),
    "global_batch_size": (_positive, "positive"),
    "global_batch_tokens": (_at_least(0), ">= 0 (0 = use --global-batch-size)"),
    "train_iters": (_positive, "positive"),
    "lr": (_positive, "positive"),
    "min_lr": (_at_least(0), ">= 0"),
    "lr_warmup_iters": (_at_least(0), ">= 0"),
    "lr_decay_fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "weight_decay": (_at_least(0), ">= 0"),
    "adam_beta1": (_fraction, "in [0, 1)"),
    "adam_beta2": (_fraction, "in [0, 1)"),
    "adam_eps": (_positive, "positive"),
    "clip_grad": (_at_least(0), ">= 0 (0 = no clipping)"),
    "muon_momentum": (_fraction, "in [0, 1)"),
    "muon_ns_steps": (_positive, "positive"),
    "qk_clip_tau": (_at_least(0), ">= 0 (0 = off)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "max_nonfinite_steps": (_positive, "positive"),
    "gc_interval": (_at_least(0), ">= 0 steps (0 = Python's automatic collector)"),
    "loss_chunk_tokens": (_at_least(0), ">= 0 tokens (0 = off; e.g. 4096)"),
    "tensor_model_parallel_size": (_positive, "positive"),
    "pipeline_model_parallel_size": (_positive, "positive"),
    "virtual_pipeline_model_parallel_size": (_positive, "positive"),
    "expert_model_parallel_size": (_positive, "positive"),
    "context_parallel_size": (_positive, "positive"),
    "save_interval": (_positive, "positive"),
    "exit_interval": (_at_least(0), ">= 0 (0 = never)"),
    "keep_last": (_at_least(0), ">= 0 (0 = keep all)"),
    "log_interval": (_positive, "positive"),
    "eval_interval": (_at_least(0), ">= 0 (0 = never)"),
    "eval_iters": (_positive, "positive"),
    "eval_long_min_length": (_at_least(0), ">= 0 (0 = off)"),
    "eval_long_max_tokens": (_at_least(0), ">= 0 (0 = all)"),
    "metrics_interval": (_at_least(0), ">= 0 (0 = never)"),
    "profile_step": (_at_least(0), ">= 0 (0 = off)"),
    "peak_flops_per_gpu": (_at_least(0), ">= 0 (0 = detect)"),
}


def _flag(name: str) -> str:
    """How a user sets ``name``: its Megatron-style flag, else ``--set train.NAME``."""
    return f"--{name.replace('_', '-')}" if name in FLAG_FIELDS else f"--set train.{name}"


# flags of launch/pretrain.py that map 1:1 onto TrainConfig fields (Megatron-LM spelling)
FLAG_FIELDS = {
    "train_iters": int,
    "save": str,
    "load": str,
    "save_interval": int,
    "exit_interval": int,
    "micro_batch_size": int,
    "global_batch_size": int,
    "seq_length": int,
    "lr": float,
    "min_lr": float,
    "seed": int,
    "tensor_model_parallel_size": int,
    "pipeline_model_parallel_size": int,
    "virtual_pipeline_model_parallel_size": int,
    "expert_model_parallel_size": int,
    "context_parallel_size": int,
    "cp_mode": str,
    "log_interval": int,
    "eval_interval": int,
    "eval_long_min_length": int,
    "profile_step": int,
    "run_dir": str,
    "tokenizer_dir": str,
    "loss_chunk_tokens": int,
}


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """The run config ``to_dict`` wrote (a checkpoint's meta.json); training fields this version
        does not know are left out (they describe how the weights were trained, not the model)."""
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        train = {k: v for k, v in values.get("train", {}).items() if k in known}
        return cls(model=ModelConfig.from_dict(values["model"]), train=TrainConfig(**train))

    def validate(self, world_size: int = 1) -> "RunConfig":
        t = self.train.validate()
        self.model.validate(t.tensor_model_parallel_size, t.expert_model_parallel_size)
        model_parallel = t.tensor_model_parallel_size * t.pipeline_model_parallel_size * t.context_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size x --context-parallel-size = {model_parallel}; change these "
                f"sizes or the number of processes"
            )
        from train.context import check_layout

        check_layout(self)
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of micro_batch_size "
                f"({t.micro_batch_size}) x data-parallel size ({dp})"
            )
        pp, vpp = t.pipeline_model_parallel_size, t.virtual_pipeline_model_parallel_size
        stages = pp * max(vpp, 1)
        if self.model.num_layers < stages:
            raise ConfigError(
                f"model.num_layers={self.model.num_layers} is fewer than the {stages} pipeline stages "
                f"(pipeline {pp} x virtual {vpp}); every stage needs at least one layer"
            )
        tp = t.tensor_model_parallel_size
        sequence_parallel = t.sequence_parallel or (tp > 1 and "moe" in self.model.ffn_types)
        if sequence_parallel and (t.micro_batch_size * t.seq_length) % tp:
            raise ConfigError(
                f"sequence parallelism (on with --sequence-parallel, and always with MoE and TP > 1) splits the "
                f"micro_batch_size x seq_length = {t.micro_batch_size} x {t.seq_length} tokens of a micro-batch over "
                f"--tensor-model-parallel-size={tp} ranks; make --seq-length or --micro-batch-size a multiple of it"
            )
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if vpp > 1 and micro_batches % pp:
            raise ConfigError(
                f"interleaved pipeline (virtual stages) needs the micro-batches per step ({micro_batches} = "
                f"global_batch_size / (micro_batch_size x DP)) to be a multiple of the pipeline size ({pp})"
            )
        return self


# training settings that belong to a preset run by name (flags and --set still override them):
# the quick start's tiny run uses 64-token sequences to train at ~20 steps/s on 2 CPU cores
PRESET_TRAIN_DEFAULTS = {"tiny": {"seq_length": 64}}


def load_run_config(name_or_file: str) -> RunConfig:
    """A preset name or a JSON file (see module docstring)."""
    path = Path(name_or_file)
    if name_or_file in PRESETS:
        return RunConfig(model=get_preset(name_or_file), train=TrainConfig(**PRESET_TRAIN_DEFAULTS.get(name_or_file, {})))
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ConfigError(f"--config {name_or_file}: file not found (or use a preset: {sorted(PRESETS)})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config {name_or_file}: not valid JSON ({err})") from None
        unknown = sorted(set(raw) - {"preset", "model", "train"})
        if unknown:
            raise ConfigError(f"--config {name_or_file}: unknown top-level key(s) {unknown}; use preset, model, train")
        preset = raw.get("preset")
        model = get_preset(preset) if preset is not None else ModelConfig()
        if "model" in raw:
            model = model.replace(**_checked(ModelConfig, raw["model"], "model"))
        train = {**PRESET_TRAIN_DEFAULTS.get(preset, {}), **_checked(TrainConfig, raw.get("train", {}), "train")}
        return RunConfig(model=model, train=TrainConfig(**train))
    raise ConfigError(f"--config {name_or_file!r}: neither a preset ({sorted(PRESETS)}) nor an existing file")


def _checked(cls, values: dict, section: str) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {section} field(s) {unknown}; known: {sorted(known)}")
    return values


def apply_override(run: RunConfig, assignment: str) -> None:
    """Apply one ``[model.|train.]field=value`` assignment in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set train.lr=1e-3")
    key, text = assignment.split("=", 1)
    section, _, name = key.rpartition(".")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not section:
        candidates = [s for s, fields in (("model", model_fields), ("train", train_fields)) if name in fields]
        if len(candidates) != 1:
            raise ConfigError(
                f"--set {key}: {'unknown field' if not candidates else 'ambiguous field'}; "
                f"write model.{name} or train.{name}"
            )
        section = candidates[0]
    if section == "model":
        setattr(run.model, name, coerce_field(run.model, name, text))
    elif section == "train":
        if name not in train_fields:
            raise ConfigError(f"--set train.{name}: unknown field; known: {sorted(train_fields)}")
        current = getattr(run.train, name)
        setattr(run.train, name, _parse_like(current, text, f"train.{name}"))
    else:
        raise ConfigError(f"--set {key}: section must be model or train")


def _parse_like(current, text: str, label: str):
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, list):
            return [_list_item(x) for x in text.split(",") if x]
    except ValueError as err:
        raise ConfigError(f"{label}={text!r}: {err}") from None
    return text


def _list_item(text: str):
    """A number where the item reads as one (data weights), else the text (a path such as ``./data``)."""
    try:
        return json.loads(text) if text[:1] in "0123456789.-" else text
    except ValueError:
        return text
