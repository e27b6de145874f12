"""``imagepipe cancel ID``: cancel a run's open batches at the provider.

An open batch is one the run created and has not collected yet
(:attr:`imagepipe.runs.batches.RunBatches.open`). Cancelling it asks the provider to stop
it; what it finished is still returned. The command reads the store and writes nothing:
it takes no lease, so a ``watch`` or ``resume`` following the run goes on, and sees the
status change on its next poll. The branches stay pending: the next ``resume`` collects
what the cancelled batches finished and reports the rest unfinished (exit 4).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from imagepipe import settings
from imagepipe.batches.setup import BATCH
from imagepipe.durable import StoreMissing
from imagepipe.errors import AccountStopped, BadInput, BatchCancelFailed, UnknownRun
from imagepipe.execution import opened_store, provider_settings, read_root, run_command
from imagepipe.providers.base import AccountError, ProviderError
from imagepipe.providers.options import build_options
from imagepipe.providers.registry import get_batch_class, get_provider_class
from imagepipe.runs.batches import GroupProgress, RunBatches
from imagepipe.runs.model import Invocation, RunSpec

if TYPE_CHECKING:
    from imagepipe.providers.batch import BatchProvider

__all__ = ["cancel_batches"]


def cancel_batches(url: str, run_id: str) -> list[GroupProgress]:
    """Cancel the open batches of run ``run_id``; each as the provider then describes it
    (none for a run with no open batch)."""

    async def cancel() -> list[GroupProgress]:
        try:
            async with opened_store(url, create=False, write=False) as store:
                root = await read_root(store, run_id)
                batched = root.options.get(BATCH) is True
                notes = await store.notes(root.id) if batched else {}
        except StoreMissing as missing:
            raise UnknownRun(run_id, missing.where) from None
        groups = RunBatches.from_notes(notes).open
        if not groups:
            return []
        client = _batch_client(RunSpec.from_stored(root.args))
        cancelled = []
        try:
            for group in groups:
                batch_id = group.batch_id
                assert batch_id is not None, "an open group's batch was created"
                try:
                    info = await client.cancel_batch(batch_id)
                except ProviderError as exc:
                    account = isinstance(exc, AccountError)  # a refused key, say: fix it first
                    code = AccountStopped.exit_code if account else BatchCancelFailed.exit_code
                    raise BatchCancelFailed(run_id, batch_id, exc.message, code) from exc
                cancelled.append(dataclasses.replace(group, batch=info.as_json()))
        finally:
            await client.aclose()
        return cancelled

    return run_command(cancel, run_id)


def _batch_client(spec: RunSpec) -> BatchProvider:
    """The run's batch client, as a run makes it: its stored options, the key checked."""
    provider_class = get_provider_class(spec.provider)
    batch_class = get_batch_class(spec.provider)
    if batch_class is None:  # a run can be sent in batches only by a provider that has them
        raise BadInput(f"provider {spec.provider!r} has no batch mode")
    pairs = [(key, str(value)) for key, value in spec.options.items()]
    options = build_options(provider_class.Options, spec.provider, pairs)
    try:
        provider_class.check_credentials(options)
    except ProviderError as exc:
        raise BadInput(exc.message) from exc
    invocation = Invocation(time_scale=settings.time_scale())
    client: BatchProvider = batch_class.create(options, provider_settings(invocation))
    return client
