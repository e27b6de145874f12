"""A run's branches through a provider's batch mode, as durable steps of the run.

The workflow (:func:`imagepipe.pipeline.image_pipeline`) holds the run's branches
(``ctx.promise``) and hands them to :meth:`BatchDriver.drive`, which:

1. **sends** the groups an earlier invocation planned but did not finish sending;
2. **plans** the pending branches that no group holds (``submit``): grouped within the
   provider's limits, within the run's spending caps, and noted (``batch.plan.<p>``)
   before anything is sent, so that a branch belongs to one group for good;
3. **sends** each new group, each step a durable step of the run (its result noted before
   the next begins): the input file written, its attempts started with their worst case
   reserved against the caps, the file uploaded (or found, if a killed process uploaded it
   without noting it), the batch created (or found likewise);
4. returns there unless it ``follow``\\ s: then it **polls** the open batches at a polite
   interval that backs off while nothing changes, and **collects** each that has ended:
   the output and error files are streamed line by line, each line settling its branch
   as a synchronous attempt would (the image written under a staged name, the value
   recorded, then the file renamed), and the branches the batch did not run go back to
   pending with the group's ``collected`` note, in one transaction.

A collection killed midway is read again from the start: a branch already settled is
skipped, so none is recorded twice. :class:`OneByOne` is what ``resume --no-batch`` hands
the workflow instead: it drops the groups never sent and runs the free branches here.
See docs/internals/batch.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imagepipe.durable import ErrorInfo, Handle, RunContext
from imagepipe.durable.errors import DrainRun, SpendingCapReached
from imagepipe.errors import BadInput, BatchTrouble, BatchUnfinished
from imagepipe.pipeline import Deps, ImageValue, branch_request, image_value
from imagepipe.providers.base import AccountError, ProviderError
from imagepipe.providers.batch import (
    BatchInfo,
    BatchProvider,
    group_lines,
    write_input_file,
)
from imagepipe.runs.batches import (
    BatchesSubmitted,
    GroupProgress,
    RunBatches,
    group_key,
    plan_key,
)

__all__ = ["BatchDriver", "OneByOne", "Reserve"]

T = TypeVar("T")

#: what an attempt of a branch reserves against the run's caps (see :mod:`imagepipe.budget`)
Reserve = Callable[[str, Mapping[str, Any]], Mapping[str, int]]
#: what a branch the batch did not bill gives back: its whole reservation
_NOTHING = {"micro_usd": 0, "images": 0}
#: lines collected between two waits for their records to be durable
_LINES_A_COMMIT = 256


@dataclass
class BatchDriver:
    """Sends, polls and collects a run's batches (see the module's docstring)."""

    client: BatchProvider
    #: where input files are written before their upload
    folder: Path
    #: plan and send the pending branches that no group holds
    submit: bool
    #: poll and collect until no batch is open
    follow: bool
    #: an attempt's reservation, at the batch rate (None: a free provider)
    reserve: Reserve | None = None
    #: requests in one batch at most
    batch_size: int = 50_000
    #: batches the run may create at most
    max_batches: int = 100
    #: seconds between polls: the first, and the most it backs off to
    poll_first: float = 10.0
    poll_most: float = 300.0
    #: told of the run's batches whenever they change
    on_progress: Callable[[RunBatches], None] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    #: retries of a step that met a transient error (a 5xx, a timeout)
    step_attempts: int = 5
    _capped: SpendingCapReached | None = field(default=None, init=False)

    async def drive(self, ctx: RunContext[Deps], handles: Sequence[Handle[ImageValue]]) -> None:
        by_id = {handle.id: handle for handle in handles}
        try:
            for group in self._batches(ctx).unsent:
                await self._send(ctx, group.group, group.members, by_id)
            while True:
                self._capped = None
                if self.submit:
                    await self._plan_and_send(ctx, handles, by_id)
                if not self.follow:  # the command says what it sent (no progress to tell)
                    batches = self._batches(ctx)
                    if self._capped is not None and not batches.open:
                        raise self._capped  # not one request fits: nothing to follow
                    raise BatchesSubmitted(batches)
                self._report(ctx)
                collected = await self._follow(ctx, by_id)
                # a batch's actual cost is below its worst case: what a cap held back
                # may fit now
                if not (self.submit and self._capped is not None and collected):
                    break
        except AccountError as exc:
            raise DrainRun(exc.message) from exc
        except ProviderError as exc:
            raise BatchTrouble(ctx.run_id, exc.message) from exc
        await ctx.durable()  # every settlement announced: the handles know their outcome
        left = [h for h in handles if not h.settled]
        if not left:
            return
        if self._capped is not None:
            raise self._capped
        raise BatchUnfinished(ctx.run_id, len(left), self._why_unfinished(ctx))

    # -- planning and sending --------------------------------------------------------

    async def _plan_and_send(
        self,
        ctx: RunContext[Deps],
        handles: Sequence[Handle[ImageValue]],
        by_id: Mapping[str, Handle[ImageValue]],
    ) -> None:
        batches = self._batches(ctx)
        free = [h for h in handles if not h.settled and not batches.holds(h.id)]
        if not free:
            return
        chosen = await self._within_caps(ctx, free)
        if not chosen:
            return  # not one fits the caps: no planning to note
        deps = ctx.deps
        lines = (self.client.request_line(_request(deps, h, h.attempts + 1)) for h in chosen)
        grouped: list[list[tuple[str, int]]] = [
            [(line.custom_id, by_id[line.custom_id].attempts + 1) for line in group]
            for group in group_lines(
                lines, max_requests=self.batch_size, max_bytes=self.client.max_file_bytes
            )
        ]
        first = batches.next_group
        if first + len(grouped) > self.max_batches:
            raise BadInput(
                f"{len(chosen):,} requests need {len(grouped)} more batches, and run "
                f"{ctx.run_id} may have {self.max_batches} in all (IMAGEPIPE_MAX_BATCHES); "
                "nothing was sent"
            )
        # From this note on, each branch belongs to its group: no replay regroups them.
        await ctx.note(plan_key(batches.plans), {"first": first, "groups": grouped})
        for offset, members in enumerate(grouped):
            await self._send(ctx, first + offset, members, by_id)

    async def _within_caps(
        self, ctx: RunContext[Deps], free: list[Handle[ImageValue]]
    ) -> list[Handle[ImageValue]]:
        """The first of ``free`` whose worst cases fit in what the caps leave; the rest
        wait: the run stops at its cap once the open batches are collected (their actual
        costs may leave room, for the next invocation)."""
        if self.reserve is None:
            return free
        spending = await ctx.store.spending(ctx.run_id)
        left = {m: s.limit - s.spent for m, s in spending.items() if s.limit is not None}
        if not left:
            return free
        chosen: list[Handle[ImageValue]] = []
        for handle in free:
            units = self.reserve(handle.func, handle.args)
            over = next((m for m in left if units.get(m, 0) > left[m]), None)
            if over is not None:
                spent = spending[over]
                assert spent.limit is not None
                self._capped = SpendingCapReached(
                    ctx.run_id, over, spent.limit - left[over], spent.limit, units[over]
                )
                break
            for meter in left:
                left[meter] -= units.get(meter, 0)
            chosen.append(handle)
        return chosen

    async def _send(
        self,
        ctx: RunContext[Deps],
        group: int,
        members: Sequence[tuple[str, int]],
        by_id: Mapping[str, Handle[ImageValue]],
    ) -> None:
        """Group ``group``'s steps, each noted before the next: its file, its attempts
        started (their worst cases reserved), its upload, its batch."""
        client, run_id = self.client, ctx.run_id
        deps = ctx.deps
        name = input_file_name(run_id, group)
        path = self.folder / name
        held = [(by_id[branch], attempt) for branch, attempt in members]

        async def write() -> dict[str, Any]:
            self.folder.mkdir(parents=True, exist_ok=True)
            lines = [client.request_line(_request(deps, h, n)) for h, n in held]
            written = await asyncio.to_thread(write_input_file, path, lines)
            return {
                "name": name,
                "requests": written.requests,
                "bytes": written.bytes,
                "sha256": written.sha256,
                "written_at": int(time.time()),
            }

        file = await ctx.step(group_key(group, "file"), write)
        reserve = self.reserve
        await ctx.start_attempts(
            [(h, n, reserve(h.func, h.args) if reserve else {}) for h, n in held]
        )

        async def upload() -> dict[str, Any]:
            # an earlier process may have uploaded it and been killed before noting it
            found = await client.find_upload(name, not_before=int(file["written_at"]) - 3600)
            if found is None or found.bytes != file["bytes"]:
                if not path.exists():  # removed since: the same lines again
                    await write()
                found = await client.upload_file(path, filename=name)
            return {"file_id": found.id, "bytes": found.bytes, "created_at": found.created_at}

        stored = await ctx.step(group_key(group, "upload"), self._retried, step=upload)

        async def create() -> dict[str, Any]:
            # one file makes one batch: an earlier process may have made it, unnoted
            file_id = str(stored["file_id"])
            since = int(stored["created_at"]) - 3600
            found = await client.find_batch(file_id, not_before=since)
            if found is None:
                metadata = {"imagepipe_run": run_id[:512], "imagepipe_group": str(group)}
                found = await client.create_batch(file_id, metadata=metadata)
            return found.as_json()

        await ctx.step(group_key(group, "created"), self._retried, step=create)
        with contextlib.suppress(OSError):
            path.unlink()  # the provider has it, and the batch is made of it
            self.folder.rmdir()  # the last one: no empty folder among the images

    async def _retried(self, step: Callable[[], Awaitable[T]]) -> T:
        """``step()``, again after a transient error (a 5xx, a timeout), with back-off."""
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.step_attempts),
            wait=wait_exponential(multiplier=self.poll_first / 10, max=self.poll_most),
            retry=retry_if_exception(_transient),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await step()
        raise AssertionError("tenacity returns or raises")  # pragma: no cover

    # -- polling and collecting --------------------------------------------------------

    async def _follow(self, ctx: RunContext[Deps], by_id: Mapping[str, Handle[ImageValue]]) -> int:
        """Poll and collect until no batch is open; how many were collected."""
        # The run's lease before the first poll (it is taken with the first write, and
        # polls that see no change write nothing): one follower polls and downloads, and
        # any other is told at once that the run is busy.
        await ctx.durable()
        # holding the run, nothing else writes its input files: those no longer needed go
        tidy_input_files(self.folder, ctx.run_id, self._batches(ctx))
        delay = self.poll_first
        collected = 0
        while True:
            batches = self._batches(ctx)
            if not batches.open:
                return collected
            changed = False
            for group in batches.open:
                assert group.batch_id is not None
                try:
                    info = await self.client.get_batch(group.batch_id)
                except ProviderError as exc:
                    if not _transient(exc):
                        raise
                    continue  # polled again after the back-off
                if _progress(info) != _progress_of(group.batch):
                    await ctx.note(
                        group_key(group.group, "status"),
                        {"batch": info.as_json(), "polled_at": time.time()},
                    )
                    changed = True
                if info.terminal:
                    collect = self._collector(ctx, group.group, group.members, info, by_id)
                    await self._retried(collect)
                    collected += 1
                    changed = True
            if changed:
                self._report(ctx)
                delay = self.poll_first
                continue
            await self.sleep(delay)
            delay = min(delay * 1.5, self.poll_most)

    def _collector(
        self,
        ctx: RunContext[Deps],
        group: int,
        members: Sequence[tuple[str, int]],
        info: BatchInfo,
        by_id: Mapping[str, Handle[ImageValue]],
    ) -> Callable[[], Awaitable[None]]:
        """:meth:`_collect` as a step that a transient error (a 5xx, a timeout) repeats:
        each reading starts from the top and skips the branches settled by the last."""

        async def collect() -> None:
            await ctx.durable()  # the settlements of a reading cut short are known
            await self._collect(ctx, group, members, info, by_id)

        return collect

    async def _collect(
        self,
        ctx: RunContext[Deps],
        group: int,
        members: Sequence[tuple[str, int]],
        info: BatchInfo,
        by_id: Mapping[str, Handle[ImageValue]],
    ) -> None:
        """Settle the group's branches from the batch's files, line by line; the branches
        the batch did not run go back to pending."""
        mine = {b: by_id[b] for b, _ in members if b in by_id and not by_id[b].settled}
        # A collection killed midway may have recorded branches but not what they cost:
        # their reservations give way to it now (a cost already settled is left alone).
        before = [by_id[b] for b, _ in members if b in by_id and by_id[b].settled]
        await ctx.settle_costs([(h, _cost_of(h)) for h in before])
        seen: set[str] = set()
        unfinished: list[Handle[ImageValue]] = []
        #: the retryable errors of branches that go back to pending for them
        retry: dict[str, ErrorInfo] = {}
        costs: list[tuple[Handle[Any], Mapping[str, int]]] = []
        resolved = rejected = 0
        async for result in self.client.results(info):
            handle = mine.get(result.custom_id)
            if handle is None or result.custom_id in seen:
                continue  # settled before (a collection read again), or not this run's
            seen.add(result.custom_id)
            if result.image is not None:
                value, promote = await _value(ctx.deps, handle, result.image, info.id)
                ctx.settle(handle, value=value, after_recorded=promote)
                costs.append((handle, _paid(value)))
                resolved += 1
            elif result.error is not None and getattr(result.error, "retryable", False):
                # a 429, a 5xx, a timeout: a synchronous attempt would be retried, so the
                # branch goes back to pending with its error (nothing was billed)
                retry[handle.id] = ErrorInfo.from_exception(result.error)
                unfinished.append(handle)
            elif result.error is not None:
                ctx.settle(handle, error=ErrorInfo.from_exception(result.error))
                costs.append((handle, _NOTHING))
                rejected += 1
            else:
                unfinished.append(handle)
            if len(costs) >= _LINES_A_COMMIT:
                await ctx.settle_costs(costs)
                costs = []
                await ctx.durable()  # memory stays flat: the records keep up with the lines
        await ctx.settle_costs(costs)
        unfinished += [h for b, h in mine.items() if b not in seen]
        await ctx.settle_costs([(h, _NOTHING) for h in unfinished])
        if info.input_file_id:
            # its batch has ended: deleted before the group is noted as collected, so a
            # kill in between leaves it for the next collection to delete, not for ever
            with contextlib.suppress(ProviderError):
                await self.client.delete_file(info.input_file_id)
        error = ErrorInfo("BatchUnfinished", _why(info), retryable=True)
        started_at = float(info.created_at or time.time())
        for handle in unfinished:  # written with the note below, in one transaction
            ctx.fail_attempt(handle, started_at, retry.get(handle.id, error))
        collected = {
            "status": info.status,
            "resolved": resolved,
            "rejected": rejected,
            "unfinished": len(unfinished),
            "retryable": len(retry),
            "at": time.time(),
        }
        await ctx.note(group_key(group, "collected"), collected)

    # -- what the driver tells -----------------------------------------------------------

    def _batches(self, ctx: RunContext[Deps]) -> RunBatches:
        return RunBatches.from_notes(ctx.notes)

    def _report(self, ctx: RunContext[Deps]) -> None:
        if self.on_progress is not None:
            self.on_progress(self._batches(ctx))

    def _why_unfinished(self, ctx: RunContext[Deps]) -> str:
        ended = [g for g in self._batches(ctx) if g.collected and g.collected.get("unfinished")]
        if not ended:
            return "no batch holds them"
        last = ended[-1]
        done = last.collected or {}
        why = f"batch {last.batch_id} {done.get('status', '')}"
        if done.get("retryable"):
            why += f", {done['retryable']} with an error worth retrying"
        return why


@dataclass
class OneByOne:
    """What ``resume --no-batch`` hands a batch run's workflow: the groups never sent are
    dropped (an uploaded file deleted, their reservations given back), unless a killed
    process created a batch of one (then it is open, and this refuses), and every branch
    that no open batch holds runs here, one request each."""

    client: BatchProvider | None
    #: where the run's input files were written
    folder: Path

    async def drive(self, ctx: RunContext[Deps], handles: Sequence[Handle[ImageValue]]) -> None:
        try:
            await self._found_unnoted(ctx)
        except AccountError as exc:
            raise DrainRun(exc.message) from exc
        except ProviderError as exc:
            raise BatchTrouble(ctx.run_id, exc.message) from exc
        batches = RunBatches.from_notes(ctx.notes)
        if batches.open:
            raise BadInput(open_batches_refusal(ctx.run_id, batches))
        for group in batches.unsent:
            await self._delete_upload(group)
            await ctx.note(group_key(group.group, "dropped"), {"at": time.time()})
        tidy_input_files(self.folder, ctx.run_id, RunBatches.from_notes(ctx.notes))
        # A dropped group's attempts were started with their batch reservations, and
        # nothing was sent: given back (again after a kill: each is given back once).
        by_id = {handle.id: handle for handle in handles}
        started = [
            (by_id[branch], _NOTHING)
            for group in RunBatches.from_notes(ctx.notes)
            if group.dropped
            for branch, attempt in group.members
            if branch in by_id and not by_id[branch].settled and by_id[branch].attempts == attempt
        ]
        await ctx.settle_costs(started)
        for handle in handles:
            if not handle.settled:
                ctx.run_held(handle)

    async def _delete_upload(self, group: GroupProgress) -> None:
        """Delete ``group``'s file at the provider: the one noted, or one a killed process
        uploaded without noting it (found by its name, as the upload step finds it)."""
        if self.client is None:
            return
        with contextlib.suppress(ProviderError):
            file_id = (group.upload or {}).get("file_id")
            if file_id is None and group.file is not None:
                since = int(group.file.get("written_at") or 0) - 3600
                found = await self.client.find_upload(str(group.file["name"]), not_before=since)
                file_id = None if found is None else found.id
            if file_id is not None:
                await self.client.delete_file(str(file_id))

    async def _found_unnoted(self, ctx: RunContext[Deps]) -> None:
        """Note the batch that a killed process created from an unsent group's file
        without noting it: it runs, so its branches are not run here too."""
        if self.client is None:
            return
        for group in RunBatches.from_notes(ctx.notes).unsent:
            upload = group.upload or {}
            if not upload.get("file_id"):
                continue
            since = int(upload.get("created_at") or 0) - 3600
            found = await self.client.find_batch(str(upload["file_id"]), not_before=since)
            if found is not None:
                await ctx.note(group_key(group.group, "created"), found.as_json())


def input_file_name(run_id: str, group: int) -> str:
    """The name of group ``group``'s input file, here and at the provider."""
    return f"{run_id}.g{group}.jsonl"


def tidy_input_files(folder: Path, run_id: str, batches: RunBatches) -> None:
    """Remove from ``folder`` (the run's own, under its image folder) the input files of
    the groups that no longer need one (their batch created, or the group dropped) and
    the temporary files of a write that a kill cut short; the folder too, once empty.
    Only under the run's lease: nothing else writes there then."""
    if not folder.is_dir():
        return
    done = {input_file_name(run_id, g.group) for g in batches if g.sent or g.dropped}
    for entry in folder.iterdir():
        if entry.name in done or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if empty: no empty folder among the images


def open_batches_refusal(run_id: str, batches: RunBatches) -> str:
    """Why ``resume --no-batch`` cannot run now: batches that may still run its branches."""
    ids = ", ".join(str(g.batch_id) for g in batches.open)
    return (
        f"run {run_id} has open batches ({ids}) that may still run its branches: let them "
        f"end (imagepipe watch {run_id}) or cancel them (imagepipe cancel {run_id}) first"
    )


def _request(deps: Deps, handle: Handle[Any], attempt: int) -> Any:
    args = handle.args
    return branch_request(
        deps,
        handle.id,
        attempt,
        args["prompt"],
        args["style"],
        args.get("variation", 0),
        args.get("crash", False),
    )


async def _value(
    deps: Deps, handle: Handle[Any], image: Any, batch_id: str
) -> tuple[ImageValue, Callable[[], object] | None]:
    args = handle.args
    return await image_value(
        deps,
        handle.id,
        image,
        args["style"],
        args.get("variation", 0),
        args.get("prompt_index"),
        batch_id=batch_id,
    )


def _paid(value: Mapping[str, Any]) -> Mapping[str, int]:
    """What a branch resolved from a batch's line cost (nothing known: its reservation)."""
    paid = value.get("cost", {}).get("micro_usd")
    return {} if paid is None else {"micro_usd": paid}


def _cost_of(handle: Handle[Any]) -> Mapping[str, int]:
    """What a branch a batch settled cost: its image's price, or nothing if rejected."""
    if handle.state == "resolved" and isinstance(handle.value, Mapping):
        return _paid(handle.value)
    return _NOTHING


def _transient(exc: BaseException) -> bool:
    return (
        isinstance(exc, ProviderError)
        and not isinstance(exc, AccountError)
        and bool(getattr(exc, "retryable", False))
    )


def _progress(info: BatchInfo) -> tuple[str, int, int, int]:
    return (info.status, info.counts.total, info.counts.completed, info.counts.failed)


def _progress_of(batch: Mapping[str, Any] | None) -> tuple[str, int, int, int] | None:
    if batch is None:
        return None
    return _progress(BatchInfo.from_json(batch))


def _why(info: BatchInfo) -> str:
    """Why a batch did not run a request, in one line."""
    why = f"batch {info.id} {info.status}"
    if info.errors:
        why += f": {info.errors[0].message}"
    return why
