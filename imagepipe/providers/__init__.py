"""Image providers: a registry of the entry-point group ``imagepipe.providers`` (the
built-ins ``simulated``, ``openai`` and ``replicate``, and plugins), the contract a
provider class follows (:mod:`imagepipe.providers.contract`), its instances'
:class:`ImageProvider` protocol, and the errors a provider raises. Provider modules load
only when used."""

from imagepipe.providers.base import (
    AccountError,
    AuthenticationFailed,
    CredentialsError,
    ImageProvider,
    InvalidRequest,
    MissingCredentials,
    ProviderError,
    ProviderImage,
    ProviderRequest,
    ProviderTimeout,
    SubSteps,
    TransientProviderError,
)
from imagepipe.providers.faults import Faults
from imagepipe.providers.simulated import SimulatedProvider, image_url, nominal_duration_ms

__all__ = [
    "AccountError",
    "AuthenticationFailed",
    "CredentialsError",
    "Faults",
    "ImageProvider",
    "InvalidRequest",
    "MissingCredentials",
    "ProviderError",
    "ProviderImage",
    "ProviderRequest",
    "ProviderTimeout",
    "SimulatedProvider",
    "SubSteps",
    "TransientProviderError",
    "image_url",
    "nominal_duration_ms",
]
