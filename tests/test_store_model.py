"""Property test: the SQLite store behaves like a simple in-memory model of promises.

Random sequences of create / settle / attempt / reopen-branch / read / commit / reopen-store
give the same answers. Reopening the store without a commit must lose exactly the writes
since the last commit, and nothing else.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from imagepipe.durable import ErrorInfo, SQLiteStore

IDS = st.sampled_from(["r", "r.0", "r.1", "r.2", "other", "other.0"])
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
    func: str
    args: list[Any]
    state: str = "pending"
    value: Any = None
    error: ErrorInfo | None = None
    attempts: int = 0
    failures: int = 0
    history: dict[int, ErrorInfo] = field(default_factory=dict)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "store.db"
        self.store = SQLiteStore.open(self.path)
        self.current: dict[str, Model] = {}
        self.committed: dict[str, Model] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(promise_id=IDS, func=st.sampled_from(["f", "g"]), args=st.lists(JSON, max_size=3))
    def create(self, promise_id: str, func: str, args: list[Any]) -> None:
        record, created = self.store.create(promise_id, func=func, args=args)
        expected_new = promise_id not in self.current
        assert created == expected_new
        if expected_new:
            self.current[promise_id] = Model(func, args)
        model = self.current[promise_id]
        assert (record.func, record.args) == (model.func, model.args)

    @precondition(lambda self: self.current)
    @rule(data=st.data(), value=JSON)
    def resolve(self, data: st.DataObject, value: Any) -> None:
        promise_id = data.draw(st.sampled_from(sorted(self.current)))
        model = self.current[promise_id]
        record = self.store.resolve(promise_id, value)
        if model.state == "pending":  # the first settle wins
            model.state, model.value = "resolved", value
        assert (record.state, record.value) == (model.state, model.value)

    @precondition(lambda self: self.current)
    @rule(data=st.data(), error=ERRORS)
    def reject(self, data: st.DataObject, error: ErrorInfo) -> None:
        promise_id = data.draw(st.sampled_from(sorted(self.current)))
        model = self.current[promise_id]
        record = self.store.reject(promise_id, error)
        if model.state == "pending":
            model.state, model.error = "rejected", error
        assert (record.state, record.error) == (model.state, model.error)

    @precondition(lambda self: self.current)
    @rule(data=st.data(), error=st.none() | ERRORS)
    def attempt(self, data: st.DataObject, error: ErrorInfo | None) -> None:
        promise_id = data.draw(st.sampled_from(sorted(self.current)))
        model = self.current[promise_id]
        number = self.store.start_attempt(promise_id)
        model.attempts += 1
        assert number == model.attempts
        if error is not None:
            self.store.fail_attempt(promise_id, number, error, started_at=1.0)
            model.failures += 1
            model.history[number] = error

    @precondition(lambda self: self.current)
    @rule(data=st.data())
    def reopen_promise(self, data: st.DataObject) -> None:
        promise_id = data.draw(st.sampled_from(sorted(self.current)))
        model = self.current[promise_id]
        self.store.reopen(promise_id)
        if model.state == "rejected":
            model.state, model.error, model.failures = "pending", None, 0

    @rule()
    def commit(self) -> None:
        self.store.commit()
        self.committed = copy.deepcopy(self.current)

    @rule()
    def reopen_store(self) -> None:
        """A crash: whatever was not committed is gone, everything committed is there."""
        self.store.close()
        self.store = SQLiteStore.open(self.path)
        self.current = copy.deepcopy(self.committed)

    @invariant()
    def reads_match_the_model(self) -> None:
        for promise_id in ("r", "r.0", "r.1", "r.2", "other", "other.0"):
            record = self.store.get(promise_id)
            model = self.current.get(promise_id)
            if model is None:
                assert record is None
                continue
            assert record is not None
            assert (record.func, record.args, record.state) == (model.func, model.args, model.state)
            assert (record.value, record.error) == (model.value, model.error)
            assert (record.attempts, record.failures) == (model.attempts, model.failures)
            stored = {a.attempt: a.error for a in self.store.attempts(promise_id)}
            assert stored == model.history


TestStoreAgainstModel = StoreMachine.TestCase
TestStoreAgainstModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
