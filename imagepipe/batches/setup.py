"""How a command runs a run through a batch: whether it does, the checks before anything is
written, and the driver the workflow is handed.

- :func:`batch_mode_of` — whether this invocation sends the run's branches in batches:
  ``--batch``/``--no-batch``, else the run's own way (stored with it)
- :func:`check_batchable` — ``--batch`` with a provider or model that has no batch mode,
  or more requests than the run's batches may hold: one line, exit 2, nothing written
- :func:`check_same_way` — ``--batch`` on a stored run that was not started with it
- :func:`driver_for` — the :class:`~.driver.BatchDriver` (or :class:`~.driver.OneByOne`)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from imagepipe import settings
from imagepipe.durable import PromiseRecord
from imagepipe.errors import BadInput
from imagepipe.providers.contract import ProviderSettings
from imagepipe.providers.options import ProviderOptions, build_options
from imagepipe.providers.registry import batch_refusal, get_batch_class, get_provider_class
from imagepipe.runs.batches import RunBatches
from imagepipe.runs.model import Invocation, RunSpec
from imagepipe.text import quoted

if TYPE_CHECKING:
    from imagepipe.batches.driver import BatchDriver, OneByOne, Reserve

__all__ = [
    "BATCH",
    "batch_mode_of",
    "check_batchable",
    "check_same_way",
    "check_spec_batchable",
    "driver_for",
]

#: the root option that says a run's own way is through batches
BATCH = "batch"
#: seconds between polls of a batch: the first, and the most it backs off to (times
#: IMAGEPIPE_TIME_SCALE)
POLL_FIRST, POLL_MOST = 10.0, 300.0


def batch_mode_of(root_options: Mapping[str, Any], invocation: Invocation) -> bool:
    """Whether this invocation sends the run's pending branches in batches."""
    if invocation.batch is not None:
        return invocation.batch
    return root_options.get(BATCH) is True


def check_batchable(provider: str, options: ProviderOptions, branches: int) -> None:
    """:class:`BadInput` unless ``branches`` requests of ``provider`` with ``options`` can go
    through its batch mode, in at most ``IMAGEPIPE_MAX_BATCHES`` batches."""
    refusal = batch_refusal(provider, options)
    if refusal is not None:
        raise BadInput(f"--batch: {refusal}")
    cls = get_batch_class(provider)
    assert cls is not None, "a provider without a batch mode is refused above"
    size = settings.batch_size(int(cls.max_requests))
    needed, allowed = math.ceil(branches / size), settings.max_batches()
    if needed > allowed:
        raise BadInput(
            f"--batch: {branches:,} requests need {needed} batches of at most {size:,}, and a "
            f"run may have {allowed} (IMAGEPIPE_MAX_BATCHES); nothing was sent"
        )


def check_same_way(run_id: str, root_options: Mapping[str, Any], invocation: Invocation) -> None:
    """:class:`BadInput` for ``--batch`` on a stored run that was not started with it.

    A run's way is stored when it starts, and everything that picks a run up reads it
    there (a plain ``resume``, ``watch``, the workers): a batch sent by one ``resume
    --batch`` would be left uncollected while the next ``resume`` paid for its branches
    again one by one. A detached run's workers, too, run its branches one by one; and a
    provider or model without a batch mode can only be started without ``--batch``."""
    if invocation.batch and root_options.get(BATCH) is not True:
        raise BadInput(
            f"--batch: run {quoted(run_id)} was not started with --batch, and a run keeps "
            "the way it started: resume it without --batch, or start a new run with --batch"
        )


def check_spec_batchable(spec: RunSpec, invocation: Invocation) -> None:
    """:func:`check_batchable` for the run ``spec`` describes, as ``run --batch`` (and its
    ``--dry-run``) would make it: its identity options with this invocation's ``-o``."""
    provider_class = get_provider_class(spec.provider)
    pairs = [(k, str(v)) for k, v in spec.options.items()] + list(invocation.option_pairs)
    options = build_options(provider_class.Options, spec.provider, pairs)
    check_batchable(spec.provider, options, spec.branch_count)


def driver_for(
    root: PromiseRecord,
    provider: str,
    options: ProviderOptions,
    provider_settings: ProviderSettings,
    *,
    batch: bool,
    follow: bool,
    submit: bool,
    out_dir: Any,
    reserve: Reserve | None,
    on_progress: Callable[[RunBatches], None] | None,
    time_scale: float,
) -> BatchDriver | OneByOne | None:
    """What the workflow is handed for this invocation: a :class:`BatchDriver` to send
    (``submit``) and collect (``follow``) the run's batches; :class:`OneByOne` for a run
    that has used batches but goes on one request at a time; None for a run that never
    used any."""
    from imagepipe.batches.driver import BatchDriver, OneByOne  # only for a batch run

    if not batch and root.options.get(BATCH) is not True:
        return None  # a run that never used a batch: nothing to load
    cls = get_batch_class(provider)
    if not batch:
        client = None if cls is None else cls.create(options, provider_settings)
        return OneByOne(client, folder=out_dir / ".batches")
    if cls is None:
        raise BadInput(f"--batch: provider {provider!r} has no batch mode")
    client = cls.create(options, provider_settings)
    return BatchDriver(
        client=client,
        folder=out_dir / ".batches",
        submit=submit,
        follow=follow,
        reserve=reserve,
        batch_size=settings.batch_size(int(cls.max_requests)),
        max_batches=settings.max_batches(),
        poll_first=POLL_FIRST * time_scale,
        poll_most=POLL_MOST * time_scale,
        on_progress=on_progress,
    )
