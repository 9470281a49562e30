"""Checksums of a checkpoint's files: written when it is saved, verified before it is loaded.

``iter_N/checksums.json`` maps every file of the checkpoint (model and optimizer shards, RNG
states; not ``meta.json``, which is written after it and parsed on load) to its size and SHA-256.
A missing file (a deleted ``optimizer/`` folder), a truncated one or a flipped byte is found
before any weight is read. Hashing is spread over the ranks (each hashes about 1/world of the
bytes, each mostly the files it wrote, a few threads per rank) and costs one read of the
checkpoint (docs/log.md has the estimate for the 48B model).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECKSUMS = "checksums.json"
UNCHECKED = {"meta.json", CHECKSUMS}
CHUNK_BYTES = 8 << 20
THREADS_PER_RANK = 4


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file to be checksummed."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*")) if p.is_file() and str(p.relative_to(folder)) not in UNCHECKED
    }


# files written by one rank: megatron's shards ``__{rank}_{i}.distcp``, our ``rng/rank_{rank}.pt``
_WRITER = re.compile(r"(?:__(\d+)_\d+\.distcp|rank_(\d+)\.pt)$")


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files (the same split on every rank): the files rank r wrote go to rank r mod
    world (at save time they are still in its page cache), the others largest first to the least
    loaded rank."""
    load = [0] * world
    owners = {}
    for name, size in sizes.items():
        match = _WRITER.search(name)
        if match:
            owners[name] = int(match.group(1) or match.group(2)) % world
            load[owners[name]] += size
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        if name not in owners:
            owners[name] = min(range(world), key=lambda r: (load[r], r))
            load[owners[name]] += size
    return sorted(name for name, owner in owners.items() if owner == rank)


def _hash_many(folder: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    with ThreadPoolExecutor(min(THREADS_PER_RANK, len(names))) as pool:  # hashlib releases the GIL
        return dict(zip(names, pool.map(lambda n: sha256_of(folder / n), names)))


def _rank_world():
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value) -> list:
    import torch.distributed as dist

    _, world = _rank_world()
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def write_checksums(folder: str | os.PathLike) -> None:
    """Hash ``folder``'s files (a collective: every rank hashes its share) and write
    ``checksums.json`` from rank 0. Call after every rank has finished writing."""
    folder = Path(folder)
    rank, world = _rank_world()
    sizes = _files(folder) if rank == 0 else None
    sizes = _broadcast(sizes)
    hashes = {}
    for part in _gather(_hash_many(folder, _share(sizes, rank, world))):
        hashes.update(part)
    if rank == 0:
        table = {name: {"bytes": sizes[name], "sha256": hashes[name]} for name in sorted(sizes)}
        tmp = folder / (CHECKSUMS + ".tmp")
        tmp.write_text(json.dumps({"algorithm": "sha256", "files": table}, indent=1) + "\n")
        os.replace(tmp, folder / CHECKSUMS)


def _broadcast(value):
    import torch.distributed as dist

    _, world = _rank_world()
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def verify_checksums(folder: str | os.PathLike) -> str | None:
    """Check ``folder`` against its ``checksums.json`` (a collective). Returns None when it matches,
    ``"unchecked"`` when the checkpoint has no checksums (written before they existed), else a
    description of the first problems found (the same string on every rank)."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    rank, world = _rank_world()
    if not listing.exists():
        return "unchecked"
    try:
        table = json.loads(listing.read_text())["files"]
        sizes = {name: int(entry["bytes"]) for name, entry in table.items()}
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"{CHECKSUMS} is unreadable ({type(err).__name__})"
    gone = sorted({n.split("/")[0] for n in sizes if "/" in n and not (folder / n.split("/")[0]).is_dir()})
    problems = [f"{top}/ is missing" for top in gone]
    mine = [n for n in _share(sizes, rank, world) if n.split("/")[0] not in gone]
    present = []
    for name in mine:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != sizes[name]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {sizes[name]}")
        else:
            present.append(name)
    for name, digest in _hash_many(folder, present).items():
        if digest != table[name]["sha256"]:
            problems.append(f"{name} does not match its checksum")
    everything = sorted({p for part in _gather(problems) for p in part})
    if not everything:
        return None
    shown = "; ".join(everything[:3])
    return shown + (f" (and {len(everything) - 3} more)" if len(everything) > 3 else "")
