"""Run configs: a JSON file naming a preset equals ``--config NAME`` plus its own fields, and the
recipes in configs/ (one per arm of the paper's comparison and size) differ in the layer pattern only."""

import dataclasses
import json
from pathlib import Path

import pytest

from model.config import ModelConfig
from model.presets import ARMS, PRESETS, as_arm, get_preset
from train.config import PRESET_TRAIN_DEFAULTS, TrainConfig, load_run_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE_SIZES = ("small", "scaling-653m")


def _fields(run) -> dict:
    """Every model and train field of a run config, keyed ``model.x`` / ``train.x``."""
    out = {f"model.{f.name}": getattr(run.model, f.name) for f in dataclasses.fields(ModelConfig)}
    out.update({f"train.{f.name}": getattr(run.train, f.name) for f in dataclasses.fields(TrainConfig)})
    return out


def _differences(a: dict, b: dict) -> dict:
    return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_json_naming_a_preset_keeps_every_preset_value(tmp_path, preset):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": preset}))
    assert _differences(_fields(load_run_config(str(path))), _fields(load_run_config(preset))) == {}


def test_json_changes_only_the_fields_it_lists(tmp_path):
    assert PRESET_TRAIN_DEFAULTS["tiny"]["seq_length"] == 64 != TrainConfig().seq_length
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "tiny", "model": {"layer_pattern": "GGGA"},
                                "train": {"lr": 1e-4, "global_batch_size": 8}}))
    from_file = _fields(load_run_config(str(path)))
    by_name = _fields(load_run_config("tiny"))
    assert from_file["train.seq_length"] == 64  # the tiny preset's training default
    assert _differences(from_file, by_name) == {
        "model.layer_pattern": ("GGGA", "KKKA"),
        "train.lr": (1e-4, by_name["train.lr"]),
        "train.global_batch_size": (8, by_name["train.global_batch_size"]),
    }
    # a listed field wins over the preset's training default
    path.write_text(json.dumps({"preset": "tiny", "train": {"seq_length": 32}}))
    assert load_run_config(str(path)).train.seq_length == 32


def _recipes(size: str) -> dict:
    return {arm: ROOT / "configs" / f"{size}-{arm}.json" for arm in ARMS}


def test_configs_hold_one_recipe_per_arm_and_size():
    expected = {path for size in RECIPE_SIZES for path in _recipes(size).values()}
    assert set((ROOT / "configs").glob("*.json")) == expected


@pytest.mark.parametrize("size", RECIPE_SIZES)
def test_recipes_of_one_size_differ_only_in_the_layer_pattern(size):
    runs = {arm: load_run_config(str(path)) for arm, path in _recipes(size).items()}
    for arm, run in runs.items():
        run.validate(world_size=1)
        run.validate(world_size=8)  # the batch also splits over 8 data-parallel GPUs
        assert json.loads(_recipes(size)[arm].read_text())["preset"] == size
        # the arm's mixers are the paper's (model/presets.py as_arm); everything else is the preset's
        assert run.model.layer_types == as_arm(get_preset(size), arm).layer_types
        assert set(_differences(run.model.to_dict(), get_preset(size).to_dict())) <= {"layer_pattern", "name"}
    reference = _fields(runs["kimi-linear"])
    for arm in ("mla", "gdn-h"):
        assert set(_differences(_fields(runs[arm]), reference)) == {"model.layer_pattern", "model.name"}
    types = {arm: set(run.model.layer_types) for arm, run in runs.items()}
    assert types == {"mla": {"mla"}, "gdn-h": {"gdn", "mla"}, "kimi-linear": {"kda", "mla"}}


def test_653m_recipe_is_the_papers():
    """[TR] Table 2, 653M row: lr 2.006e-3, batch 336 (taken as sequences of 4096), 38.8B tokens,
    context 4096, Muon (MuonClip), WSD."""
    t = load_run_config(str(ROOT / "configs" / "scaling-653m-kimi-linear.json")).train
    assert (t.lr, t.global_batch_size, t.seq_length) == (2.006e-3, 336, 4096)
    assert abs(t.train_iters * t.global_batch_size * t.seq_length / 38.8e9 - 1) < 1e-3
    assert (t.optimizer, t.lr_schedule) == ("muon", "wsd") and t.qk_clip_tau > 0
