"""A run through a provider's batch mode (``run --batch``): half the price, hours later.
A run's batches as its notes hold them are in :mod:`imagepipe.runs.batches`.

- :mod:`.progress` — a run's batches as its notes hold them (:class:`RunBatches`): what the
  driver resumes from and what ``show``, ``list``, ``--json`` and the live table read
- :mod:`.driver` — :class:`BatchDriver`: plan, write, upload, create (each a durable step
  of the run); poll; collect, line by line; :class:`OneByOne` for ``resume --no-batch``
- :mod:`.setup` — the driver a command hands the workflow, and the checks made before
  anything is written (a provider or model without batch mode, too many batches)
"""
