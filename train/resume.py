"""Which checkpoint a run starts from, checked before it is used.

* ``--load DIR/iter_N``: exactly that checkpoint; damage is an error.
* ``--load DIR`` (a save folder), or no ``--load`` and ``--save`` holds checkpoints (auto-resume):
  the one ``DIR/latest`` names; if it is damaged (checksums, a missing ``optimizer/``, an unreadable
  file) the run falls back to the previous complete checkpoint and says so. Damaged checkpoints of
  the run's own ``--save`` move to ``SAVE/damaged/`` so that nothing resumes from them later.
* A start older than checkpoints already in ``--save`` (a ``--load`` of an earlier step, an edited
  ``latest``) is refused: keep-last, ``latest`` and auto-resume would mix the two timelines. Use a new
  ``--save``, or ``--set train.discard_newer_checkpoints=true`` to move the newer ones to
  ``SAVE/discarded/`` and branch from the older step.

After the start is known, ``metrics.jsonl`` loses the records past it (the abandoned tail of an
interrupted run), so every step appears once. See docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from train import checkpoint as ckpt
from train.errors import DataError, agree


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def candidates(t) -> tuple[list[Path], bool]:
    """The checkpoints to try, best first, and whether falling back to the next one is allowed."""
    if t.load:
        path = Path(t.load)
        if (path / ckpt.META).exists():
            return [path], False
        root = ckpt.resolve(path).parent  # raises a clear error when there is nothing to load
    elif t.save and ckpt.complete_steps(t.save):
        root = Path(t.save)
    else:
        return [], False
    steps = ckpt.complete_steps(root)
    first = ckpt.latest_step(root)
    order = [first] + [s for s in reversed(steps) if s < first]
    return [ckpt.iteration_dir(root, s) for s in order], True


def _own(path: Path, t) -> bool:
    return bool(t.save) and path.parent.resolve() == Path(t.save).resolve()


def _check_no_newer(t, step: int) -> None:
    """Refuse (or, when asked, move aside) checkpoints in --save newer than the starting step."""
    if not t.save:
        return
    newer = [s for s in ckpt.complete_steps(t.save) if s > step]
    if not newer:
        return
    if not t.discard_newer_checkpoints:
        raise ckpt.CheckpointError(
            f"--save {t.save} already holds checkpoints newer than the starting step {step} "
            f"({', '.join(f'iter_{s:07d}' for s in newer[:4])}{' ...' if len(newer) > 4 else ''}); continuing "
            f"would mix two runs. To continue the run in --save, drop --load (a run resumes from its --save); to "
            f"start again from step {step}, use a new --save folder or add --set train.discard_newer_checkpoints=true "
            f"(moves the newer ones to {Path(t.save) / 'discarded'})"
        )
    if _rank() == 0:
        ckpt.move_aside(t.save, newer, "discarded")
        _point_latest_at_newest(t.save)
    _barrier()


def _point_latest_at_newest(root) -> None:
    """``latest`` names the newest remaining complete checkpoint (or is removed when none is left)."""
    remaining = ckpt.complete_steps(root)
    if remaining:
        ckpt.write_latest(root, remaining[-1])
    else:
        (Path(root) / ckpt.LATEST).unlink(missing_ok=True)


def _load(path: Path, model, optimizer, meta: dict) -> None:
    """Model, optimizer (a ``train.optimizer.TrainingOptimizer``) and RNG state of ``path``
    (checksums first). A collective."""
    ckpt.verify(path)
    ckpt.load_model_state(model, path)
    optimizer.reload_model_params()  # its own copies were made before the load
    ckpt.load_optimizer_state(optimizer, path, int(meta["step"]), expected=bool(meta.get("has_optimizer")))
    ckpt.load_rng_state(path)


def resume(run, model, optimizer, train_loader, log) -> int:
    """Load the run's starting checkpoint (if any) into model, optimizer, RNGs and data loader;
    returns the starting step. A collective; every error is raised on every rank."""
    t = run.train
    paths, may_fall_back = agree(candidates, t)
    for index, candidate in enumerate(paths):
        try:
            meta = agree(ckpt.read_meta, candidate)
        except ckpt.CheckpointError as err:
            _fall_back_or_raise(err, paths, index, may_fall_back, t, log)
            continue
        ckpt.check_model_config(meta["model"], run.model, candidate)  # a mismatch is no damage: no fallback
        agree(_check_no_newer, t, int(meta["step"]))
        try:
            agree(_load, candidate, model, optimizer, meta)
        except ckpt.CheckpointError as err:
            _fall_back_or_raise(err, paths, index, may_fall_back, t, log)
            continue
        if "data" in meta:
            agree(_load_data_position, train_loader, meta["data"], candidate)
        start = int(meta["step"])
        log(f"resumed from {candidate} at step {start}")
        break
    else:
        start = 0
    if _rank() == 0 and t.run_dir:
        truncate_metrics(Path(t.run_dir) / "metrics.jsonl", start)
    return start


def _fall_back_or_raise(err, paths: list[Path], index: int, may_fall_back: bool, t, log) -> None:
    """Continue with the next candidate after a damaged one (moved aside when it is ours)."""
    if not may_fall_back or index == len(paths) - 1:
        raise err
    log(f"warning: {err}; falling back to {paths[index + 1]}")
    damaged = paths[index]
    if _own(damaged, t):
        if _rank() == 0:
            ckpt.move_aside(t.save, [int(damaged.name[5:])], "damaged")
            _point_latest_at_newest(t.save)
        _barrier()


def _load_data_position(loader, state: dict, path: Path) -> None:
    try:
        loader.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise DataError(f"cannot resume the data loader from {path}: {err}") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` (written by the part of an earlier run that no checkpoint
    kept): the resumed run writes those steps again."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            record_step = step + 1  # a torn last line from a crash
        if record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
