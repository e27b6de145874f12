"""One process executes a run at a time.

The executing process holds a lease row (owner, pid, host, heartbeat) and renews it every
``HEARTBEAT`` seconds. Another process may take the lease over when the holder is gone:
at once if the holder's pid is dead on this host (so a run killed with ``kill -9`` resumes
immediately), or when its heartbeat is older than ``STALE_AFTER`` seconds (another host,
or a recycled pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from imagepipe.durable.store import Lease, Store
from imagepipe.errors import RunBusy, StoreBusy, StoreError

__all__ = ["HEARTBEAT", "STALE_AFTER", "hold_lease", "is_stale", "pid_alive"]

HEARTBEAT = 1.0
STALE_AFTER = 10.0


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


def is_stale(holder: Lease, *, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return True
    return now - holder.heartbeat_at > STALE_AFTER


@contextlib.asynccontextmanager
async def hold_lease(store: Store, run_id: str) -> AsyncIterator[Lease]:
    """Hold the run's lease for the duration of the block, or raise :class:`RunBusy`."""
    lease = Lease(
        run_id=run_id,
        owner=uuid.uuid4().hex,
        pid=os.getpid(),
        host=socket.gethostname(),
        heartbeat_at=time.time(),
    )
    holder = store.acquire_lease(lease, is_stale=is_stale)
    if holder is not None:
        raise RunBusy(run_id, f"process {holder.pid} on {holder.host}")
    heartbeat = asyncio.create_task(_renew(store, lease), name=f"lease:{run_id}")
    try:
        yield lease
    finally:
        heartbeat.cancel()
        # return_exceptions: a heartbeat that died of a store error must neither replace
        # the error this block is propagating nor be left unretrieved.
        await asyncio.gather(heartbeat, return_exceptions=True)
        with contextlib.suppress(StoreError):  # then a dead pid frees it for the next run
            store.release_lease(run_id, lease.owner)


async def _renew(store: Store, lease: Lease) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT)
        with contextlib.suppress(StoreBusy):  # a busy store: the next beat tries again
            store.renew_lease(lease.run_id, lease.owner, time.time())
            store.commit()
