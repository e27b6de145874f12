"""One owner executes a run at a time: a lease in the store, fenced by an epoch.

Every acquisition increments the key's epoch, and every write batch carries the epoch it
was made under (:class:`~.records.Fence`): the store refuses a batch whose epoch is stale
in the same transaction that would write it. So an owner that was stopped (SIGSTOP, a
long pause, a lost network) and taken over writes nothing more once it wakes up.

The owner renews its heartbeat every ``stale_after / 10`` seconds. Another process may take
the lease over when the heartbeat is older than ``stale_after`` seconds by the store's
clock, or at once when the holder's pid is dead on this host (a run killed with
``kill -9`` resumes immediately). A renewal that finds the lease taken sets :attr:`lost`,
and the owner stops executing at once; a renewal that meets a busy store tries again at
the next beat (fencing keeps the data safe meanwhile), until it has been silent for
``stale_after``: then it must assume it was taken over, and stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from pathlib import Path

from imagepipe.durable.errors import LeaseHeld, LeaseLost, StoreError
from imagepipe.durable.records import Fence, Lease
from imagepipe.durable.store import Store

__all__ = ["DEFAULT_STALE_AFTER", "LeaseKeeper", "holder_gone", "pid_alive", "reraise_if_cancelled"]

DEFAULT_STALE_AFTER = 10.0


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists here and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def holder_gone(holder: Lease) -> bool:
    """A holder on this host whose process is dead has certainly gone."""
    return holder.host == socket.gethostname() and not pid_alive(holder.pid)


def reraise_if_cancelled() -> None:
    """Raise CancelledError if this task is being cancelled. For a heartbeat that catches
    store errors: a driver whose clean-up fails once a call is cancelled (psycopg's
    rollback on a server that has just restarted) raises its own error in place of the
    cancellation, and a loop that took it for a passing failure would never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class LeaseKeeper:
    """Holds the lease on ``key`` for this process: acquire, heartbeat, release."""

    def __init__(self, store: Store, key: str, *, stale_after: float = DEFAULT_STALE_AFTER):
        self.store = store
        self.key = key
        self.stale_after = stale_after
        self.lease: Lease | None = None
        #: set (to the :class:`LeaseLost`) when another owner took the lease over
        self.lost: asyncio.Future[LeaseLost] = asyncio.get_running_loop().create_future()
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def fence(self) -> Fence | None:
        return None if self.lease is None else Fence(self.key, self.lease.epoch)

    async def check_free(self) -> None:
        """Raise :class:`LeaseHeld` if a live owner holds the key (writes nothing)."""
        holder = await self.store.lease_holder(self.key)
        if holder is not None and holder.age <= self.stale_after and not holder_gone(holder):
            raise LeaseHeld(self.key, holder)

    async def acquire(self) -> Fence:
        """Take the lease with the next epoch and start the heartbeat."""
        claim = Lease(self.key, uuid.uuid4().hex, os.getpid(), socket.gethostname())
        self.lease = await self.store.acquire_lease(
            claim, stale_after=self.stale_after, holder_gone=holder_gone
        )
        self._heartbeat = asyncio.create_task(self._renew(self.lease), name=f"lease:{self.key}")
        return Fence(self.key, self.lease.epoch)

    async def release(self) -> None:
        """Stop the heartbeat and give the lease up, unless it was lost."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self.lease is not None and not self.lost.done():
            # A store that fails now leaves the lease to expire, or to a dead-pid takeover.
            with contextlib.suppress(StoreError):
                await self.store.release_lease(self.lease)
        self.lease = None

    async def _renew(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        interval = self.stale_after / 10
        renewed = loop.time()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.renew_lease(lease)
                renewed = loop.time()
            except LeaseLost as exc:
                self.lost.set_result(exc)
                return
            except StoreError:
                reraise_if_cancelled()
                # Busy or failing for a moment: the next beat tries again. Silent for
                # longer than a takeover needs, this owner must assume it was taken over.
                if loop.time() - renewed > self.stale_after:
                    self.lost.set_result(LeaseLost(lease.key, lease.epoch))
                    return
