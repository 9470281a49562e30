"""Conversion between training checkpoints and Hugging Face ``kimi_linear`` folders.

- ``export_checkpoint(load, out)``: any checkpoint (any TP layout; megatron reshards it to one
  process) -> an HF folder written by ``model.hf_export.export_state_dict`` (config.json,
  safetensors with the release's names (docs/architecture.md, "Hugging Face names"), sharded with an index when larger than ``max_shard_size``), plus
  the run's tokenizer (the one its meta.json records, or ``tokenizer_dir``): the folder alone
  tokenizes and generates.
- ``import_hf_folder(hf_dir, save)``: an HF folder (the release's names (docs/architecture.md, "Hugging Face names") or transformers' runtime names,
  sharded or not) -> a step-0 checkpoint that ``launch/pretrain.py --load`` and
  ``train.checkpoint.load_model_for_inference`` accept.

The model's side of the format (names, shapes, configs, reading and writing HF folders) is
model/hf_export.py and model/hf_names.py; this module adds the checkpoints around it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from megatron.core import parallel_state

from model import tp
from model.config import ModelConfig
from model.hf_export import HFFolder, export_state_dict, load_hf_weights_into
from model.hf_names import HFConversionError, check_exportable, model_config_from_hf_config
from model.model import build_model
from parallel import state as pstate
from train.checkpoint import LATEST, CheckpointError, load_model_for_inference, read_meta, resolve, save_checkpoint
from train.folders import writable_folder
from train.lock import SaveFolderLock

__all__ = ["export_checkpoint", "import_hf_folder"]


def export_checkpoint(load: str | Path, out_dir: str | Path, step: int | None = None,
                      tokenizer_dir: str | Path | None = None, **kwargs) -> Path:
    """Checkpoint (any parallel layout) -> HF folder. Refuses unexportable configs before loading weights.
    The tokenizer: ``tokenizer_dir``, else the one the run recorded (``train.tokenizer_dir`` in
    meta.json), else none (with a notice)."""
    path = resolve(load, step)
    meta = read_meta(path)
    if "model" not in meta:
        raise CheckpointError(f"{path}/meta.json has no 'model' config; it was not written by this stack")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/meta.json: invalid model config ({err})") from None
    check_exportable(config, kwargs.get("allow_group_routing_mismatch", False))
    writable_folder(out_dir, "--out")  # before the weights are read
    recorded = (meta.get("train") or {}).get("tokenizer_dir") or None
    tokenizer_dir = tokenizer_dir or recorded
    if tokenizer_dir is None:
        print(f"note: {path}/meta.json records no tokenizer, so the export has none; pass --tokenizer DIR "
              "(the tokenizer the data was prepared with) to include it", file=sys.stderr)
    elif not Path(tokenizer_dir).is_dir():
        source = "recorded in meta.json" if tokenizer_dir == recorded else "given"
        raise CheckpointError(f"the tokenizer {source}, {tokenizer_dir}, does not exist: pass --tokenizer DIR "
                              "(the tokenizer the data was prepared with)")
    model = load_model_for_inference(path)
    return export_state_dict(model.state_dict(), config, out_dir, tokenizer_dir=tokenizer_dir, **kwargs)


def _refuse_existing_run(save: str | Path) -> None:
    existing = sorted(p.name for p in Path(save).glob("iter_*")) + [p.name for p in Path(save).glob(LATEST)]
    if existing:
        raise HFConversionError(
            f"--save {save} already holds a run ({', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}); "
            f"importing into it would reset its latest checkpoint to step 0: choose a new --save folder"
        )


def import_hf_folder(
    hf_dir: str | Path,
    save: str | Path,
    name: str | None = None,
    progress: bool = True,
    allow_group_routing_mismatch: bool = False,
) -> Path:
    """HF folder -> checkpoint ``save/iter_0000000`` (+ ``save/run.json`` for ``pretrain.py --config``)."""
    _refuse_existing_run(save)
    folder = HFFolder(hf_dir)
    config = model_config_from_hf_config(
        folder.config, name=name or Path(hf_dir).resolve().name,
        allow_group_routing_mismatch=allow_group_routing_mismatch,
    )
    created = not Path(save).exists()
    try:
        # the lock also refuses a --save that cannot be written, before the weights are read
        with SaveFolderLock(save):
            _refuse_existing_run(save)  # again: another job may have written there meanwhile
            if not parallel_state.model_parallel_is_initialized():
                pstate.initialize(pstate.ParallelDims())
            if tp.tp_size() != 1:
                raise HFConversionError("import runs in one process (TP=1); the checkpoint is resharded when loaded")
            model = build_model(config, initialize_weights=False)
            load_hf_weights_into(model, config, folder, progress)
            meta = {"model": config.to_dict(), "source": {"hf": str(Path(hf_dir).resolve())}}
            path = save_checkpoint(save, 0, model, None, meta)
            (Path(save) / "run.json").write_text(json.dumps({"model": config.to_dict()}, indent=2) + "\n")
    except BaseException:
        if created:  # nothing half-written is left behind
            shutil.rmtree(save, ignore_errors=True)
        raise
    return path
