"""What every image provider offers, and the errors it may raise.

A provider (:class:`ImageProvider`) gets a :class:`ProviderRequest` and the branch's durable
:class:`SubSteps`, and returns a :class:`ProviderImage`; the pipeline saves it to disk.

Every :class:`ProviderError` carries ``retryable`` and ``retry_after`` (the seconds the
server asked for, or ``None``), and ``counts_as_attempt``: False for a rate limit, which
the core waits out and tries again without using up ``--max-attempts`` (the pacer bounds
those waits by the run's patience); its message is the provider's own, on one line. An
:class:`AccountError` is one of the account or the set-up (a refused key, no credit left,
an unknown model, a base URL that cannot be used, a rate limit that let nothing through
for the run's patience), not of one image: it stops the run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from imagepipe.text import one_line

if TYPE_CHECKING:
    from imagepipe.providers.options import ProviderOptions

__all__ = [
    "MAX_RETRY_AFTER",
    "AccountError",
    "AnswerTooLarge",
    "AuthenticationFailed",
    "BaseURLUnusable",
    "CannotConnect",
    "ContentRejected",
    "CredentialsError",
    "ImageProvider",
    "InvalidRequest",
    "MissingCredentials",
    "PredictionFailed",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderImage",
    "ProviderProtocolError",
    "ProviderRequest",
    "ProviderTimeout",
    "QuotaExceeded",
    "RateLimitPatienceExceeded",
    "RateLimited",
    "RefusedURL",
    "ServerError",
    "SubSteps",
    "TransientProviderError",
    "UnknownModel",
    "exit_code_of",
    "one_line",
]

T = TypeVar("T")

#: a server asking for a longer wait than this (seconds) is not retried in this process
MAX_RETRY_AFTER = 120.0


def _over_cap(retry_after: float | None) -> bool:
    return retry_after is not None and retry_after > MAX_RETRY_AFTER


# ------------------------------------------------------------- the real providers' one


@dataclass(frozen=True)
class ProviderRequest:
    """One image to make. Plain data: the core builds it for each durable attempt."""

    #: final text to send (style template already applied)
    prompt: str
    #: the branch's durable id, e.g. ``"pipeline-17.3"``; sent as the idempotency key
    idempotency_key: str
    #: durable attempt number, 1, 2, ...
    attempt: int
    #: this provider's validated options (see :mod:`imagepipe.providers.options`)
    options: ProviderOptions
    #: the branch's style and variation, and the user's prompt before the style's template
    style: str = ""
    variation: int = 0
    subject: str = ""
    #: demo crash mode (the simulated provider's ``abstract`` style fails its first attempt)
    crash: bool = False


@dataclass(frozen=True)
class ProviderImage:
    """What :meth:`ImageProvider.generate` returns; the core saves ``data`` to disk."""

    data: bytes
    mime: str  # image/png, image/jpeg, image/webp
    model: str | None
    #: x-request-id (openai) or the prediction id (replicate)
    request_id: str | None
    revised_prompt: str | None = None
    usage: dict[str, Any] | None = None
    seed: int | None = None
    #: where the bytes were downloaded from, if they were
    source_url: str | None = None
    #: how long the image took, if the provider knows better than the wall clock
    duration_ms: int | None = None


class SubSteps(Protocol):
    """Durable sub-steps of the current branch, given by the core.

    First execution: ``await run(fn, **kwargs)`` calls ``await fn(**kwargs)`` and stores its
    JSON result durably as child promise ``"<branch id>.<n>"`` before returning it. On
    replay (a resume after a kill) the n-th call returns the stored result WITHOUT calling
    ``fn``. Results must be JSON values.
    """

    async def run(self, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T: ...


class ImageProvider(Protocol):
    """A real provider: one instance per run, shared by all its branches."""

    @property
    def name(self) -> str: ...

    async def generate(self, request: ProviderRequest, steps: SubSteps) -> ProviderImage: ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------ errors


class ProviderError(Exception):
    """A failure reported by the provider.

    ``retryable`` says whether another attempt may succeed (a class default, overridden per
    instance, e.g. by ``x-should-retry``); ``retry_after`` is the wait in seconds the server
    asked for; ``status`` and ``code`` are the HTTP status and the provider's error code.

    Whatever the status, a retryable error whose server asks for more than
    :data:`MAX_RETRY_AFTER` seconds is not retried in this process: its message says to
    resume later.
    """

    retryable: bool = True
    retry_after: float | None = None
    status: int | None = None
    code: str | None = None
    #: False: a failure that is a wait, not a failed attempt (the core retries it without
    #: counting it against ``--max-attempts``, see imagepipe.durable.retry)
    counts_as_attempt: bool = True
    #: the exit code of a run that fails with this error: 1, a run that failed on its own
    exit_code: ClassVar[int] = 1

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        if retryable is not None:
            self.retryable = retryable
        if self.retryable and _over_cap(retry_after):
            message = f"{message}; resume later (the provider asked to wait {retry_after:.0f} s)"
            self.retryable = False
        message = one_line(message)
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.status = status
        self.code = code

    #: the attempt's paid request succeeded before this error (an image made, then its
    #: download failed): billed, whatever this error's status
    billed = False

    @property
    def unpaid(self) -> bool:
        """The provider answered with an error status: it made nothing and bills nothing
        (a spending cap gives the attempt's reservation back). A timeout, a dropped
        connection or an answer that could not be used may have been paid, and so has an
        attempt whose paid request succeeded before the error (``billed``)."""
        return not self.billed and self.status is not None and self.status >= 400


class TransientProviderError(ProviderError):
    """Overloaded, rate limited, a dropped connection: worth another attempt."""


class ProviderTimeout(TransientProviderError):
    """The provider did not answer in time."""


class ProviderConnectionError(TransientProviderError):
    """The connection failed or was dropped before a complete answer."""


class CannotConnect(ProviderConnectionError):
    """No connection could be made (refused, the host not found, no route): retryable
    once, but a base URL that every request fails to reach so is the set-up's fault
    (:class:`BaseURLUnusable`). Nothing was sent, so nothing is billed."""

    @property
    def unpaid(self) -> bool:
        return not self.billed


class ServerError(TransientProviderError):
    """A 5xx answer (or 408/409): the provider's side failed."""


class RateLimited(TransientProviderError):
    """A 429 rate limit: a wait, not a failed attempt (it does not use up
    ``--max-attempts``; the run's patience bounds it). Not retryable here when the server
    asks for more than 120 s."""

    counts_as_attempt = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        retryable: bool | None = None,
        status: int | None = 429,
        code: str | None = None,
    ) -> None:
        if _over_cap(retry_after) and retryable is not False:
            message = "rate limited"  # the base class adds "; resume later (...)"
        super().__init__(
            message, retryable=retryable, retry_after=retry_after, status=status, code=code
        )


class InvalidRequest(ProviderError):
    """The provider refuses the request itself (content policy, bad style): never retried."""

    retryable = False


class ContentRejected(InvalidRequest):
    """Refused by the provider's content policy or moderation."""


class AccountError(ProviderError):
    """An error of the account or the set-up, not of one image: every request would meet
    it alike, so the run stops (imagepipe turns it into :class:`~imagepipe.durable.
    DrainRun`): no new request is sent, those in flight end, and the rest of the run
    stays pending until it is fixed and resumed. Never retried. ``fix`` says what to fix,
    naming the variable or option (``check OPENAI_API_KEY``); a plugin raises this, or a
    subclass, for its own account errors."""

    retryable = False
    #: what to fix when the provider does not say better (see :class:`HTTPProvider`)
    fix = "check the provider's settings"

    def __init__(self, message: str, *, fix: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if fix is not None:
            self.fix = fix


class QuotaExceeded(AccountError):
    """Out of credit or over a spending limit (OpenAI's 429 ``insufficient_quota``, its
    ``billing_hard_limit_reached``, Replicate's 402): waiting does not help."""

    fix = "add credit to the account or raise its spending limit"


class UnknownModel(AccountError):
    """The provider does not know the model, or this account may not use it (OpenAI's
    ``model_not_found``, Replicate's 404 for a model)."""

    fix = (
        "check -o model; a run keeps its model, so get access to it or start a new run with another"
    )


class BaseURLUnusable(AccountError):
    """The base URL cannot be used: no scheme or host, or nothing answers there
    (connection refused, or its host not found, for several requests in a row)."""

    fix = "check the provider's base URL"

    @property
    def unpaid(self) -> bool:
        cause = self.__cause__
        refused = isinstance(cause, CannotConnect) and cause.unpaid
        return (refused and not self.billed) or super().unpaid


class RateLimitPatienceExceeded(AccountError):
    """The provider's rate limit let no request through for the run's patience
    (``IMAGEPIPE_RATE_LIMIT_PATIENCE``): every later request of the run raises it without
    being sent, and the run stops, its rest pending for a later ``imagepipe resume``."""

    fix = "wait for the provider's rate limit, or raise IMAGEPIPE_RATE_LIMIT_PATIENCE"


class CredentialsError(AccountError):
    """The key is missing or refused: every branch would fail alike. Missing, it is bad
    input before the run starts (exit 2); refused, the run stops as for any
    :class:`AccountError`. A plugin raises this or a subclass for its own key errors.
    ``exit_code`` is that of a run whose branches were rejected with it by older versions
    (a key error is no longer stored as a branch's rejection)."""

    fix = "check the provider's API key"
    exit_code = 2


class AuthenticationFailed(CredentialsError):
    """Bad key or no permission (401, 403)."""


class PredictionFailed(InvalidRequest):
    """A job-style prediction ended ``failed`` or ``canceled``."""


class ProviderProtocolError(ProviderError):
    """An answer that is not what the API documents (not JSON, or JSON of another shape):
    the provider's side is broken, and asking again would most likely pay for the same."""

    retryable = False


class AnswerTooLarge(ProviderError):
    """An answer (image, JSON or stream) past its size limit: never retried, it would only
    come back as large."""

    retryable = False


class RefusedURL(ProviderError):
    """An image URL imagepipe will not fetch: not http(s), or a private, loopback or
    link-local address that is not the API's own origin."""

    retryable = False


class MissingCredentials(CredentialsError):
    """The key's environment variable is not set: exit 2 before anything is written."""

    def __init__(self, variable: str) -> None:
        super().__init__(
            f"no API key: set {variable} (this provider reads its key from it)",
            fix=f"set {variable}",
        )
        self.variable = variable


def exit_code_of(type_name: str) -> int:
    """The exit code of a run whose branch failed with a stored error of ``type_name``.

    A stored error keeps only its class's name (``ErrorInfo.type``), so the name is looked
    up among :class:`ProviderError` and its subclasses (a plugin's own are there once its
    provider is loaded) and that class's :attr:`~ProviderError.exit_code` is the answer; 1
    for any other name."""
    codes = [cls.exit_code for cls in _subclasses(ProviderError) if cls.__name__ == type_name]
    return max(codes, default=ProviderError.exit_code)


def _subclasses(base: type[ProviderError]) -> list[type[ProviderError]]:
    found, pending = [], [base]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
