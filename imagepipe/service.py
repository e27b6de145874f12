"""What the commands do: start, resume, show, list and fix runs. No printing, no typer here.

A run is a root promise whose arguments are its identity (:class:`RunSpec`); how this
invocation executes it (retry budget, concurrency, simulated faults) is an
:class:`Invocation` and may differ from one ``resume`` to the next. The store is named by
a URL (a plain path is a SQLite file). What the commands share with :mod:`imagepipe.detached`
(opening the store, the event loop, a run's identity and execution) is in
:mod:`imagepipe.execution`; a detached run is executed by :mod:`imagepipe.detached`.
"""

from __future__ import annotations

import dataclasses

from imagepipe.batches.setup import BATCH, check_same_way
from imagepipe.budget import MICRO_USD, caps_of
from imagepipe.durable import (
    PromiseRecord,
    Store,
    StoreMissing,
    record_run,
)
from imagepipe.durable.lifecycle import is_detached
from imagepipe.durable.records import RootRecord
from imagepipe.errors import UnknownRun
from imagepipe.execution import (
    WORKFLOW,
    check_same_spec,
    check_stored_cost_cap,
    checked_caps,
    execute_here,
    image_dir,
    image_dir_of,
    opened_store,
    read_root,
    reconcile_run_images,
    run_command,
    run_options,
    stored_outcome,
    with_provider,
)
from imagepipe.files import (
    ReconcileReport,
    claim_image_dir,
    default_image_dir,
    image_dir_owner,
    remove_temporaries,
)
from imagepipe.pipeline import IMAGE_RUN
from imagepipe.run_costs import stored_spending
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import Invocation, RunSpec, validate_run_id
from imagepipe.runs.outcome import (
    RunOutcome,
    RunSummary,
    run_state,
)
from imagepipe.runs.reporting import Reporter

__all__ = ["fix_run_images", "list_runs", "resume_run", "show_run", "start_run"]


# -- the store -----------------------------------------------------------------------


# -- commands ------------------------------------------------------------------------


def start_run(
    url: str, run_id: str, spec: RunSpec, invocation: Invocation, reporter: Reporter
) -> RunOutcome:
    """Start a run, or pick up the stored run with this id (refused if its spec differs)."""
    validate_run_id(run_id)
    spec.validate()
    invocation.validate()
    if invocation.batch:  # before the key is checked: a provider without one says so
        from imagepipe.batches.setup import check_spec_batchable
        from imagepipe.dryrun import spec_for_dry_run  # its options, without the key check

        check_spec_batchable(spec_for_dry_run(spec, invocation), invocation)
    spec = with_provider(spec, invocation)
    caps = checked_caps(spec, invocation)

    if invocation.out_dir:
        # before the store is opened: a folder that cannot take the images is bad input,
        # and nothing is paid for that could not be kept
        claim_image_dir(image_dir(invocation.out_dir), run_id, mark=False)

    async def start() -> RunOutcome:
        async with opened_store(url, create=True, write=True) as store:
            if await store.get(run_id) is None:
                claim_image_dir(image_dir(invocation.out_dir or default_image_dir(run_id)), run_id)
            options = run_options(run_id, invocation)
            if invocation.batch:
                options[BATCH] = True  # the run's own way: its resumes send batches too
            root, created = await record_run(
                store, run_id, IMAGE_RUN, spec.kwargs(), options=options
            )
            if root.parent_id is not None or root.func != WORKFLOW:
                raise UnknownRun(run_id, store.where)
            check_same_spec(run_id, RunSpec.from_stored(root.args), spec)
            check_same_way(run_id, root.options, invocation)
            await check_stored_cost_cap(store, root, caps)
            await caps.store(store, run_id)
            if root.settled:
                await reconcile_run_images(store, root)
                return await stored_outcome(store, root)
            return await _execute_stored(store, root, invocation, reporter, resumed=not created)

    return run_command(start, run_id, executes=True)


def resume_run(
    url: str,
    run_id: str,
    invocation: Invocation,
    reporter: Reporter,
    *,
    retry_failed: bool = False,
) -> RunOutcome:
    """Finish an interrupted run; settled branches are read from the store, not redone.

    With ``retry_failed``, a failed run's rejected branches are set back to pending first
    (their attempt history stays) and run again."""
    invocation.validate()
    caps_of(invocation)  # a bad cap is bad input before the store is opened

    async def resume() -> RunOutcome:
        try:
            async with opened_store(url, create=False, write=True) as store:
                root = await read_root(store, run_id)
                check_same_way(run_id, root.options, invocation)
                caps = checked_caps(RunSpec.from_stored(root.args), invocation)
                await check_stored_cost_cap(store, root, caps)
                await caps.store(store, run_id)
                reopen = retry_failed and root.state == "rejected"
                if root.settled and not reopen:
                    await reconcile_run_images(store, root)
                    return await stored_outcome(store, root)
                return await _execute_stored(
                    store, root, invocation, reporter, resumed=True, reopen=reopen
                )
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(resume, run_id, executes=True)


def show_run(url: str, run_id: str) -> RunOutcome:
    async def show() -> RunOutcome:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                outcome = await stored_outcome(store, root)
                history = await store.failed_attempts(run_id)
                # an attempt whose outcome the store does not hold (it never failed nor
                # resolved) may have been paid: the ledger knows whether it was
                costs = await store.attempt_costs(run_id, MICRO_USD)
                return dataclasses.replace(outcome, history=history, attempt_costs=costs)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None

    return run_command(show, run_id)


def fix_run_images(url: str, run_id: str) -> ReconcileReport:
    """``verify --fix``: promote the run's staged images that the store recorded, and
    remove orphans and leftover temporary files.

    Of a pending run, only what belongs to settled branches is touched: a staged image of
    a pending branch may be the attempt of a process that is only paused (a stale lease is
    no proof that nobody will record it), and the end of the run's execution tidies the
    rest under its lease."""

    async def fix() -> ReconcileReport:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                report = await reconcile_run_images(store, root, exclusive=root.settled)
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None
        directory = image_dir_of(root)
        if root.settled and image_dir_owner(directory) == run_id:
            removed = remove_temporaries(directory)
            report = dataclasses.replace(report, removed=report.removed + removed)
        return report

    return run_command(fix, run_id)


async def _batches_of(store: Store, root: RootRecord) -> RunBatches | None:
    """The batches of a run sent through a provider's batches (its notes: one read)."""
    if root.options.get(BATCH) is not True:
        return None
    return RunBatches.from_notes(await store.notes(root.id))


def list_runs(url: str, limit: int | None = None) -> list[RunSummary]:
    async def listing() -> list[RunSummary]:
        try:
            async with opened_store(url, create=False, write=False) as store:
                roots = [r for r in await store.roots(limit) if r.func == WORKFLOW]
                spent = [await stored_spending(store, r) for r in roots]
                batches = [await _batches_of(store, r) for r in roots]
        except StoreMissing:
            return []
        return [
            RunSummary(
                r.id,
                run_state(r.state),
                RunSpec.from_stored(r.args).prompt,
                r.created_at,
                r.counts,
                cost,
                groups,
            )
            for r, cost, groups in zip(roots, spent, batches, strict=True)
        ]

    return run_command(listing, None)


# -- execution -----------------------------------------------------------------------


async def _execute_stored(
    store: Store,
    root: PromiseRecord,
    invocation: Invocation,
    reporter: Reporter,
    *,
    resumed: bool,
    reopen: bool = False,
) -> RunOutcome:
    """Execute a stored run. A detached one is executed by workers, branch by branch
    under their own leases: this process joins them as one more worker of that run
    (:func:`imagepipe.detached.execute_detached`), never running a branch that a live
    worker holds. Any other run is executed here under the run's lease."""
    if is_detached(root):
        from imagepipe.detached import execute_detached  # the worker machinery: only here

        return await execute_detached(store, root, invocation, reporter, reopen=reopen)
    # a run sent in batches returns once they are created; a resume collects them
    follow = resumed or not invocation.batch
    return await execute_here(
        store, root, invocation, reporter, resumed=resumed, reopen=reopen, follow=follow
    )
