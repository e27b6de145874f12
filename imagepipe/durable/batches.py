"""Several write batches in one transaction: what ``Store.apply_each`` does with them.

A worker runs many claimed branches, each under the lease of its own id. Their writes
share one transaction (one commit, one round trip of fence checks) while each batch keeps
its own fence: a stale one is left out, the others are written together.

- :func:`merged` — the batches whose fences held, as one batch (each kind of write in
  batch order, so every promise's history stays in order)
- :func:`ended_claims` — the fences of batches that settle the promise their lease is
  named after: a claimed branch's claim ends with its settlement, in the same transaction
"""

from __future__ import annotations

from collections.abc import Sequence

from imagepipe.durable.records import Fence, WriteBatch

__all__ = ["ended_claims", "fence_key", "merged"]


def fence_key(fence: Fence) -> str:
    """Sort key of fences: the order leases are locked in (no lock-order deadlock)."""
    return fence.key


def merged(batches: Sequence[WriteBatch]) -> WriteBatch:
    """One unfenced batch holding every write of ``batches`` (their fences checked)."""
    if len(batches) == 1:
        only = batches[0]
        return WriteBatch(
            reopens=only.reopens,
            creates=only.creates,
            starts=only.starts,
            failures=only.failures,
            settlements=only.settlements,
            notes=only.notes,
        )
    out = WriteBatch()
    for batch in batches:
        out.reopens += batch.reopens
        out.creates += batch.creates
        out.starts += batch.starts
        out.failures += batch.failures
        out.settlements += batch.settlements
        out.notes += batch.notes
    return out


def ended_claims(batches: Sequence[WriteBatch]) -> list[Fence]:
    """The fences, in key order, of the batches that settle their fence's own promise."""
    ended = {
        b.fence
        for b in batches
        if b.fence is not None and any(s.id == b.fence.key for s in b.settlements)
    }
    return sorted(ended, key=fence_key)
