"""The provider contract: what a provider class must have, checked when it is loaded.

Every provider, built-in or plugin, is a class registered in the entry-point group
``imagepipe.providers`` that follows :class:`ProviderClass`; its instances follow
:class:`~imagepipe.providers.base.ImageProvider`. :func:`missing_member` is the check the
registry runs on load, so that a plugin lacking a member is one line naming the member and
what to add (exit 2), never an ``AttributeError`` in the middle of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from imagepipe.providers.base import ImageProvider
from imagepipe.providers.faults import Faults

if TYPE_CHECKING:
    from imagepipe.providers.http import Pacer
    from imagepipe.providers.options import ProviderOptions

__all__ = ["MEMBERS", "ProviderClass", "ProviderSettings", "missing_member"]


@dataclass(frozen=True)
class ProviderSettings:
    """This invocation's settings a provider may use when :meth:`ProviderClass.create`
    builds it: not part of the run's identity (a resume may change them)."""

    #: multiplies every wait (tests run at 0.01)
    time_scale: float = 1.0
    #: ``--rpm``: requests per minute to the provider, or no limit
    rpm: int | None = None
    #: ``IMAGEPIPE_COORDINATED_BACKOFF``: a 429 pauses every branch of the run
    coordinated_backoff: bool = True
    #: ``IMAGEPIPE_RATE_LIMIT_PATIENCE``: seconds a rate limit may let nothing through
    rate_limit_patience: float | None = None
    #: ``--sim-latency`` and the fault options: the simulated provider's
    sim_latency_ms: int | None = None
    faults: Faults | None = None

    def pacer(self) -> Pacer:
        """The run's pacer (rate limit and coordinated back-off) for an HTTP provider."""
        from imagepipe.providers.http import DEFAULT_PATIENCE, Pacer

        patience = self.rate_limit_patience
        return Pacer(
            rpm=self.rpm,
            coordinated=self.coordinated_backoff,
            time_scale=self.time_scale,
            patience=DEFAULT_PATIENCE if patience is None else patience,
        )


class ProviderClass(Protocol):
    """A provider class. Its instances (one per run, shared by its branches) follow
    :class:`~imagepipe.providers.base.ImageProvider`: ``name``, ``async generate(request,
    steps)`` and ``async aclose()``."""

    #: the name given to ``-p``
    name: str
    #: one line for ``imagepipe providers``
    description: str
    #: a frozen dataclass of :func:`~imagepipe.providers.options.option` fields
    Options: type[ProviderOptions]
    #: branches run at once unless ``--concurrency`` says otherwise
    default_concurrency: int
    #: what a branch costs if it is retried, for ``imagepipe providers``
    guarantee: str

    def check_credentials(self, options: ProviderOptions) -> None:
        """Raise :class:`~imagepipe.providers.base.CredentialsError` (e.g.
        ``MissingCredentials(variable)``) when the key is not there; called before
        anything is written."""

    def create(self, options: ProviderOptions, settings: ProviderSettings) -> ImageProvider:
        """The run's provider instance, built from its options and this invocation's
        settings."""
        ...


#: every member the app uses, and what a plugin lacking it should add: the class's members
#: of :class:`ProviderClass` and the instance methods of ``ImageProvider`` (``name`` is
#: both, as a class attribute)
MEMBERS: dict[str, str] = {
    "name": "a class attribute name = '<the name given to -p>'",
    "description": "a class attribute description = '<one line for imagepipe providers>'",
    "Options": "a class attribute Options = <a frozen dataclass of ProviderOptions fields>",
    "default_concurrency": "a class attribute default_concurrency = <an int, e.g. 4>",
    "guarantee": "a class attribute guarantee = '<e.g. at least once>'",
    "check_credentials": (
        "a static method check_credentials(options) that raises MissingCredentials "
        "when the key is not set"
    ),
    "create": (
        "a class method create(cls, options, settings) that returns the run's instance, "
        "e.g. cls(options, pacer=settings.pacer(), time_scale=settings.time_scale)"
    ),
    "generate": "a method async def generate(self, request, steps) -> ProviderImage",
    "aclose": "a method async def aclose(self) -> None, called once when the run ends",
}


_METHODS = frozenset({"check_credentials", "create", "generate", "aclose"})


def missing_member(cls: object) -> str | None:
    """The first member of the contract ``cls`` lacks (see :data:`MEMBERS`), or None."""
    for member in MEMBERS:
        if not hasattr(cls, member):
            return member
        if member in _METHODS and not callable(getattr(cls, member)):
            return member
    return None
