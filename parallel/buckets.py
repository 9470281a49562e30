"""Greedy grouping of consecutive items by size: communication buckets and checkpoint shards."""

from __future__ import annotations


def consecutive_groups(items: list, sizes: list[int], limit: int) -> list[list]:
    """Consecutive runs of ``items`` whose ``sizes`` add up to at most ``limit``; an item larger than
    ``limit`` gets a group of its own, and no group is empty."""
    groups, current, total = [], [], 0
    for item, size in zip(items, sizes, strict=True):
        if current and total + size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    if current:
        groups.append(current)
    return groups
