"""Tasks with an owner: :func:`owned_tasks`, an :class:`asyncio.TaskGroup` whose one
failure is raised as itself.

A task group ties its tasks to the block that owns them: none outlives it, and the first
one that fails cancels the others and the block. asyncio raises what failed as an
:class:`ExceptionGroup`, even when it is one exception; the callers here tell errors apart
by class (a store failure, the lease lost, an interruption), so the one failure is raised
as itself, and a group only when several different ones failed together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["owned_tasks"]


@contextlib.asynccontextmanager
async def owned_tasks() -> AsyncIterator[asyncio.TaskGroup]:
    """``async with owned_tasks() as tasks: tasks.create_task(...)``: on leaving the block,
    every task has ended; if one failed, the others were cancelled and its error is raised
    as itself."""
    try:
        async with asyncio.TaskGroup() as tasks:
            yield tasks
    except BaseExceptionGroup as group:
        distinct = list(dict.fromkeys(group.exceptions))  # the block may re-raise a task's
        if len(distinct) == 1:
            raise distinct[0] from distinct[0].__cause__
        raise
