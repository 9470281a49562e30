"""The HF export is self-contained: it ships the run's tokenizer and its special-token ids, so the
folder alone tokenizes, generates and detokenizes with transformers; the run records its tokenizer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ConfigError
from tests.helpers.small_models import small_run
from train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of a small KDA + MLA model on the embedded corpus, saved."""
    from train.loop import train

    save = tmp_path_factory.mktemp("run") / "run"
    train(small_run(train_iters=2, save=str(save)))
    return save


def test_run_records_the_tokenizer_of_its_data(trained):
    from data import ensure_default_dataset

    recorded = ckpt.read_meta(ckpt.resolve(trained))["train"]["tokenizer_dir"]
    default = ensure_default_dataset(small_run().train.data_cache_dir)
    assert Path(recorded) == Path(default.tokenizer_dir).resolve()


def test_export_alone_tokenizes_generates_and_detokenizes(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "launch/convert_to_hf.py", "--load", str(trained), "--out", str(tmp_path / "hf"),
           "--dtype", "float32", "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "elsewhere"
    shutil.move(tmp_path / "hf", out)  # nothing outside the folder is needed

    from transformers import AutoTokenizer, KimiLinearForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    eos = tokenizer.eos_token_id
    assert eos is not None and tokenizer.convert_ids_to_tokens(eos) == "<|endoftext|>"
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for source in (config, generation):  # no BOS/PAD in our BPE: EOS, which separates documents, stands in
        assert (source["bos_token_id"], source["eos_token_id"], source["pad_token_id"]) == (eos, eos, eos)

    model = KimiLinearForCausalLM.from_pretrained(str(out)).eval()
    assert model.generation_config.eos_token_id == eos
    prompt = "The import statement binds names"
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 20)
    text = tokenizer.decode(generated[0])
    assert text.startswith(prompt) and len(text) > len(prompt)  # the byte-level BPE round-trips the prompt


def test_export_takes_a_given_tokenizer_and_names_a_missing_one(tmp_path):
    """A checkpoint that records no tokenizer ships the one given; a recorded one that is gone is an
    error naming the fix."""
    from tests.model import hf_fixtures as fx

    from data import ensure_default_dataset
    from train.hf_checkpoint import export_checkpoint

    default = ensure_default_dataset(small_run().train.data_cache_dir)
    fx.ensure_parallel()
    model = fx.build(fx.small_config(vocab_size=8192, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    ckpt.save_checkpoint(tmp_path / "c", 1, model, None, {"model": model.model_config.to_dict()})
    export_checkpoint(tmp_path / "c", tmp_path / "hf", progress=False, tokenizer_dir=default.tokenizer_dir)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == default.eos_token_id

    ckpt.save_checkpoint(tmp_path / "d", 1, model, None,
                         {"model": model.model_config.to_dict(), "train": {"tokenizer_dir": str(tmp_path / "gone")}})
    with pytest.raises(ckpt.CheckpointError,
                       match=r"tokenizer recorded in meta.json, .*gone, does not exist: pass --tokenizer"):
        export_checkpoint(tmp_path / "d", tmp_path / "hf2", progress=False)
    small = fx.build(fx.small_config(vocab_size=512))
    ckpt.save_checkpoint(tmp_path / "e", 1, small, None, {"model": small.model_config.to_dict()})
    with pytest.raises(ValueError, match="needs vocab_size >= 8192 but the model's vocab_size is 512"):
        export_checkpoint(tmp_path / "e", tmp_path / "hf3", progress=False, tokenizer_dir=default.tokenizer_dir)


def test_tokenizer_dir_must_be_the_datas(tmp_path):
    """train.tokenizer_dir is checked against the tokenizer the data's manifests record."""
    from data import ensure_default_dataset, tokenizer_of_data, train_byte_level_bpe
    from data.tokenizer import tokenizer_fingerprint
    from train.loop import build_data

    run = small_run()
    default = ensure_default_dataset(run.train.data_cache_dir)
    found = tokenizer_of_data(default.train_prefixes)  # the manifest's path (the cache may have moved since)
    assert tokenizer_fingerprint(found) == tokenizer_fingerprint(default.tokenizer_dir)
    copy = shutil.copytree(default.tokenizer_dir, tmp_path / "same")  # the same files elsewhere
    assert tokenizer_of_data(default.train_prefixes, str(copy)) == str(copy.resolve())
    other = train_byte_level_bpe(["some other text to train on"] * 50, 300, tmp_path / "other")
    run.train.tokenizer_dir = str(other)
    with pytest.raises(ConfigError, match=r"tokenizer_dir=.*other is not the tokenizer that prepared the data"):
        build_data(run, None)
    run.train.tokenizer_dir = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="tokenizer_dir=.*missing does not exist"):
        build_data(run, None)
