"""Property test: every store backend behaves like a simple in-memory model of promises.

Random batches of creates, attempt starts, failed attempts, settlements and reopens go
through the real write path (``Store.apply``), some of them stale-fenced or conflicting;
the store is reopened at random, as after a crash. A batch is all or nothing: one that is
refused leaves the model, and the store, exactly as they were.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from imagepipe.durable import ErrorInfo, LeaseLost, Store, StoreConflict, open_store
from imagepipe.durable.records import (
    AttemptFailure,
    AttemptStart,
    Fence,
    Lease,
    NewPromise,
    Settlement,
    WriteBatch,
    canonical_json,
    encode_args,
)
from store_contract.conftest import Backend

IDS = ["r", "r.0", "r.1", "r.2", "r.0.0"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
ERRORS = st.builds(ErrorInfo, st.text(min_size=1, max_size=10), st.text(max_size=30), st.booleans())


@dataclass
class Model:
    kwargs: dict[str, Any]
    state: str = "pending"
    value: Any = None
    error: ErrorInfo | None = None
    attempts: int = 0
    failures: int = 0
    history: dict[int, ErrorInfo] = field(default_factory=dict)


Write = tuple[str, Any]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.url = self.run(backend.fresh_url())
        self.store: Store = self.run(open_store(self.url))
        self.model: dict[str, Model] = {}
        self.epoch = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.backend.release(self.url)

    # -- one batch of random writes, applied or refused whole --------------------------

    @rule(
        writes=st.lists(
            st.one_of(
                st.tuples(st.just("create"), st.tuples(st.sampled_from(IDS), JSON)),
                st.tuples(st.just("start"), st.tuples(st.sampled_from(IDS), st.integers(1, 4))),
                st.tuples(
                    st.just("fail"), st.tuples(st.sampled_from(IDS), st.integers(1, 4), ERRORS)
                ),
                st.tuples(st.just("resolve"), st.tuples(st.sampled_from(IDS), JSON)),
                st.tuples(st.just("reject"), st.tuples(st.sampled_from(IDS), ERRORS)),
                st.tuples(st.just("reopen"), st.sampled_from(IDS)),
            ),
            min_size=1,
            max_size=6,
        ),
        fenced=st.sampled_from(["none", "current", "stale"]),
    )
    def apply(self, writes: list[Write], fenced: str) -> None:
        batch = WriteBatch()
        for kind, data in writes:
            if kind == "create":
                promise_id, value = data
                parent, _, seq = promise_id.rpartition(".")
                batch.creates.append(
                    NewPromise(
                        promise_id,
                        parent or None,
                        int(seq) if parent else None,
                        "f",
                        encode_args({"v": value}),
                        1.0,
                    )
                )
            elif kind == "start":
                batch.starts.append(AttemptStart(*data))
            elif kind == "fail":
                promise_id, attempt, error = data
                batch.failures.append(
                    AttemptFailure(promise_id, attempt, 1.0, 2.0, error.to_json())
                )
            elif kind == "resolve":
                promise_id, value = data
                batch.settlements.append(
                    Settlement(promise_id, "resolved", canonical_json(value), None, 3.0)
                )
            elif kind == "reject":
                promise_id, error = data
                batch.settlements.append(
                    Settlement(promise_id, "rejected", None, error.to_json(), 3.0)
                )
            else:
                batch.reopens.append(data)
        if fenced != "none":
            if self.epoch == 0:
                self.take_lease()
            batch.fence = Fence("r", self.epoch if fenced == "current" else self.epoch - 1)
        expected, refusal, lost = self.predict(batch)
        if refusal is not None:
            with pytest.raises(refusal):
                self.run(self.store.apply(batch))
            return
        try:
            stored_lost = self.run(self.store.apply(batch))
        except (StoreConflict, LeaseLost) as exc:
            raise AssertionError(f"refused with {exc!r}, but the model accepts it") from exc
        assert refusal is None, f"the model refuses with {refusal.__name__}, the store did not"
        assert {k: (v.state, v.value, v.error) for k, v in stored_lost.items()} == lost
        self.model = expected

    def predict(
        self, batch: WriteBatch
    ) -> tuple[dict[str, Model], type[Exception] | None, dict[str, Any]]:
        model = copy.deepcopy(self.model)
        if batch.fence is not None and batch.fence.epoch != self.epoch:
            return model, LeaseLost, {}
        for promise_id in batch.reopens:
            if promise_id in model and model[promise_id].state == "rejected":
                m = model[promise_id]
                m.state, m.error, m.failures = "pending", None, 0
        for create in batch.creates:
            if create.id in model:
                return model, StoreConflict, {}
            model[create.id] = Model({"v": _decoded(create.args_json)})
        for start in batch.starts:
            m = model.get(start.id)
            if m is None or m.state != "pending" or start.attempt <= m.attempts:
                return model, StoreConflict, {}
            m.attempts = start.attempt
        for failure in batch.failures:
            m = model.get(failure.id)
            if m is None or m.state != "pending" or failure.attempt in m.history:
                return model, StoreConflict, {}
            m.history[failure.attempt] = ErrorInfo.from_json(failure.error_json, "model")
            m.failures += 1
        # Every settlement that did not take effect is answered with the stored outcome
        # (one per promise), even when what won came earlier in the same batch.
        lost: dict[str, Any] = {}
        for item in batch.settlements:
            m = model.get(item.id)
            if m is None:
                return model, StoreConflict, {}
            if m.state == "pending":
                m.state = item.state
                m.value = None if item.value_json is None else _decoded(item.value_json)
                m.error = (
                    None
                    if item.error_json is None
                    else ErrorInfo.from_json(item.error_json, "model")
                )
            else:
                value = None if item.value_json is None else _decoded(item.value_json)
                error = (
                    None if item.error_json is None else ErrorInfo.from_json(item.error_json, "m")
                )
                if (item.state, value, error) != (m.state, m.value, m.error):
                    lost[item.id] = (m.state, m.value, m.error)
        return model, None, lost

    def take_lease(self) -> None:
        lease = self.run(
            self.store.acquire_lease(
                Lease("r", f"owner{self.epoch}", 1, "model-host"),
                stale_after=10,
                holder_gone=lambda holder: True,
            )
        )
        self.epoch = lease.epoch

    @rule()
    def new_lease(self) -> None:
        self.take_lease()

    @rule()
    def restart(self) -> None:
        """A crash: every applied batch is there, nothing else."""
        self.run(self.store.close())
        self.store = self.run(open_store(self.url))

    @invariant()
    def reads_match_the_model(self) -> None:
        for promise_id in IDS:
            record = self.run(self.store.get(promise_id))
            model = self.model.get(promise_id)
            if model is None:
                assert record is None
                continue
            assert record is not None
            assert record.args["kwargs"] == model.kwargs
            assert (record.state, record.value, record.error) == (
                model.state,
                model.value,
                model.error,
            )
            assert (record.attempts, record.failures) == (model.attempts, model.failures)
        history = {
            (a.promise_id, a.attempt): a.error for a in self.run(self.store.failed_attempts("r"))
        }
        expected = {
            (pid, n): e
            for pid, m in self.model.items()
            if pid.count(".") <= 1
            for n, e in m.history.items()
        }
        assert history == expected


def _decoded(text: str) -> Any:
    import json

    value = json.loads(text)
    return value["kwargs"]["v"] if isinstance(value, dict) and "kwargs" in value else value


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_store_against_model(backend: Backend) -> None:
    run_state_machine_as_test(
        lambda: StoreMachine(backend),
        settings=settings(max_examples=40, stateful_step_count=15, deadline=None),
    )
