"""Checkpoints: megatron-core dist_checkpointing for the model and the optimizer state (both
reshardable across TP/PP/EP/DP: each optimizer tensor is described like its parameter), and
``meta.json`` (configs, step, data-loader position).

Layout::

    SAVE/iter_0000200/{model/, optimizer/, rng/, checksums.json, meta.json}
    SAVE/latest                     # "200": the newest complete checkpoint

A checkpoint is written to ``iter_0000200.tmp`` and renamed when every rank has finished, so a
crash mid-save leaves the previous checkpoint as the newest complete one. ``checksums.json``
(train/integrity.py) lets a load find damaged or missing files before reading them. Loading checks
that the checkpoint's model config matches the model and names every differing field. Which
checkpoint a run starts from, and what happens to newer or damaged ones, is train/resume.py's job.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from model.config import ModelConfig
from train import integrity

META = "meta.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def complete_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints directly under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit() and (p / META).exists())


def read_latest_marker(root: str | Path) -> int | None:
    """The step written in ``root/latest`` (None when there is no marker); a marker that is not a
    step number is refused rather than guessed around."""
    marker = Path(root) / LATEST
    try:
        raw = marker.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    text = raw.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"[0-9]{1,12}", text):
        steps = complete_steps(root)
        newest = f"iter_{steps[-1]:07d}" if steps else "none"
        raise CheckpointError(
            f"{marker} is corrupt (it holds {raw[:24]!r}, not a step number); write the step to resume from "
            f"into it or delete it to resume from the newest complete checkpoint ({newest})"
        )
    return int(text)


def latest_step(root: str | Path) -> int | None:
    """Newest complete checkpoint under ``root``: the one ``latest`` names, or the newest complete
    one when the marker is missing or names an incomplete folder (None when there is none)."""
    steps = complete_steps(root)
    marked = read_latest_marker(root) if steps else None
    if marked is not None and marked in steps:
        return marked
    return steps[-1] if steps else None


def move_aside(root: str | Path, steps: list[int], why: str) -> Path | None:
    """Move checkpoints ``steps`` of ``root`` into ``root/<why>/`` (kept for inspection, invisible to
    auto-resume and keep-last); returns that folder."""
    if not steps:
        return None
    target = Path(root) / why
    target.mkdir(exist_ok=True)
    for step in steps:
        source = iteration_dir(root, step)
        destination = target / source.name
        if destination.exists():
            destination = target / f"{source.name}.{int(time.time())}"
        os.replace(source, destination)
    return target


def write_latest(root: str | Path, step: int) -> None:
    root = Path(root)
    (root / (LATEST + ".tmp")).write_text(f"{step}\n")
    os.replace(root / (LATEST + ".tmp"), root / LATEST)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root, step: int, model, optimizer, meta: dict, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` atomically with checksums; keep the newest ``keep_last`` (0 = all).
    ``optimizer``: a ``train.optimizer.TrainingOptimizer``, or None (weights only). A collective:
    every rank calls it."""
    root = Path(root)
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "optimizer").mkdir()
        (tmp / "rng").mkdir()
    _barrier()
    _results_queue_in_process()
    model_state = model.sharded_state_dict()
    dist_checkpointing.save(model_state, str(tmp / "model"))
    # the optimizer interface (train/optimizer.py) describes its own state; None: nothing to save
    optimizer_state = optimizer.state_for_checkpoint() if optimizer is not None else None
    has_optimizer = optimizer_state is not None
    if has_optimizer:
        dist_checkpointing.save(optimizer_state, str(tmp / "optimizer"))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    integrity.write_checksums(tmp)
    _fault_injection_pause(step)
    if _rank() == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "has_optimizer": has_optimizer}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, step)
        _remove_old(root, step, keep_last)
    _barrier()
    return final


def _remove_old(root: Path, step: int, keep_last: int) -> None:
    """keep-last counts back from ``step`` (the checkpoint just written, never deleted) and also
    clears ``.tmp`` folders of earlier interrupted saves."""
    for path in root.glob("iter_*.tmp"):
        if path.name[5:-4].isdigit() and int(path.name[5:-4]) < step:
            shutil.rmtree(path, ignore_errors=True)
    if keep_last > 0:
        older = [s for s in complete_steps(root) if s < step]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)


def _results_queue_in_process() -> None:
    """megatron's synchronous save gathers its writer threads' results through a multiprocessing
    Manager queue, i.e. a helper process in the rank's process group; torchrun's and SLURM's stop
    signals reach the whole group, kill it, and the stop-save dies with BrokenPipeError. The writer
    threads run in this process, so a plain queue does the same job without a helper process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", queue.Queue()) is None:
        filesystem_async._results_queue = queue.Queue()


def _fault_injection_pause(step: int) -> None:
    """Tests kill a run in the middle of a save: KIMI_LINEAR_PAUSE_BEFORE_COMMIT=STEP:SECONDS
    sleeps after the tensors of checkpoint STEP are written and before it is committed."""
    spec = os.environ.get("KIMI_LINEAR_PAUSE_BEFORE_COMMIT", "")
    if spec and int(spec.split(":")[0]) == step:
        import time

        time.sleep(float(spec.split(":")[1]))


def read_meta(path: str | Path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.exists():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {META}); point --load at a run's save folder or "
            f"one of its iter_* folders"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is corrupt ({err}); use an earlier iter_* folder") from None


def resolve(path: str | Path, step: int | None = None) -> Path:
    """A save folder (-> its newest or given step) or an iter_* folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / META).exists() and step is None:
        return path
    chosen = step if step is not None else latest_step(path)
    if chosen is None:
        raise CheckpointError(f"no complete checkpoint under {path} (no iter_*/{META})")
    found = iteration_dir(path, chosen)
    if not (found / META).exists():
        raise CheckpointError(f"checkpoint step {chosen} not found or incomplete under {path}")
    return found


def verify(path: Path) -> bool:
    """Check the checkpoint's files against its checksums (a collective); raise CheckpointError
    naming what is damaged. False when the checkpoint predates checksums (nothing to check)."""
    problems = integrity.verify_checksums(path)
    if problems == "unchecked":
        return False
    if problems is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {problems}")
    return True


def check_model_config(saved: dict, config: ModelConfig, where) -> None:
    current = config.to_dict()
    ignore = {"name", "extra", "bos_token_id", "eos_token_id", "pad_token_id"}
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs model {v!r}"
        for k, v in current.items() if k not in ignore and saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was saved with a different model config ({'; '.join(diffs)}); load it with "
            f"the same model settings or start a new run"
        )


def load_sharded(template: dict, folder: Path, what: str, fix: str) -> dict:
    """``dist_checkpointing.load`` of ``folder`` into ``template``; a failure becomes a
    CheckpointError naming the folder, the cause and ``fix``."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass

    try:
        return dist_checkpointing.load(template, str(folder))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised with the path and a hint
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise CheckpointError(
            f"could not read the {what} in {folder} ({type(err).__name__}: {detail}); {fix}") from None


def load_model_state(model, path: Path) -> None:
    """Load the sharded model state (resharding to the current layout) into ``model``."""
    state = load_sharded(model.sharded_state_dict(), path / "model", "model state",
                         "the checkpoint is corrupt or incomplete, load an earlier iter_* folder")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def rng_state() -> dict:
    """Every generator a step may draw from (this rank's): Python, NumPy, torch CPU and CUDA, and
    megatron's model-parallel RNG tracker."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(path: Path) -> bool:
    """Restore this rank's generators (False when the checkpoint has none for this rank, e.g. it
    was written with another number of ranks; training does not depend on them bitwise then)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    file = path / "rng" / f"rank_{_rank():05d}.pt"
    if not file.exists():
        return False
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated or garbage file: torch and pickle raise many types
        raise CheckpointError(
            f"could not read the RNG state {file} ({type(err).__name__}); the checkpoint is corrupt or "
            f"incomplete, load an earlier iter_* folder"
        ) from None
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def load_optimizer_state(optimizer, path: Path, step: int, expected: bool = False) -> bool:
    """Load (and reshard) the optimizer state saved in ``path`` into ``optimizer`` (a
    ``train.optimizer.TrainingOptimizer``); False if it has none (a checkpoint imported from Hugging
    Face). ``expected``: the checkpoint was saved with one (meta.json), so a missing one is damage,
    not a fresh start."""
    folder = path / "optimizer"
    if not folder.exists() or not any(folder.iterdir()):
        if expected:
            raise CheckpointError(
                f"{folder} is missing or empty but the checkpoint was saved with optimizer state; the "
                f"checkpoint is corrupt or incomplete, load an earlier iter_* folder"
            )
        return False
    optimizer.load_checkpoint_state(folder, step)
    return True


def load_model_for_inference(checkpoint, step: int | None = None, device: str = "cpu"):
    """Single-process model from a checkpoint (any saved parallel layout), in eval mode."""
    from model.model import build_model
    from parallel import state

    path = resolve(checkpoint, step)
    meta = read_meta(path)
    config = ModelConfig.from_dict(meta["model"])
    if not parallel_state.model_parallel_is_initialized():
        state.initialize(state.ParallelDims())
    verify(path)
    model = build_model(config, initialize_weights=False)
    load_model_state(model, path)
    return model.to(device).eval()
