"""One decorator factory for the backends: every error of a database driver, met inside a
store method, becomes the core's one-line :class:`~.errors.StoreError`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from imagepipe.durable.errors import StoreError

__all__ = ["translating"]


class _Named(Protocol):
    where: str


S = TypeVar("S", bound=_Named)
P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=BaseException)

Method = Callable[Concatenate[S, P], Coroutine[Any, Any, R]]


def translating(
    driver_error: type[E] | tuple[type[E], ...], translate: Callable[[E, str], StoreError]
) -> Callable[[Method[S, P, R]], Method[S, P, R]]:
    """A decorator for the ``async`` methods of a store (which names itself ``where``):
    a ``driver_error`` (or one of several) they raise is raised again as
    ``translate(error, where)``."""

    def decorate(method: Method[S, P, R]) -> Method[S, P, R]:
        @functools.wraps(method)
        async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await method(self, *args, **kwargs)
            except driver_error as exc:
                raise translate(exc, self.where) from exc

        return wrapper

    return decorate
