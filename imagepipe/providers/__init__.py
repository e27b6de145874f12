"""Image providers: a registry of built-ins (``simulated``, ``openai``, ``replicate``) and
plugins from the entry-point group ``imagepipe.providers``, one :class:`ImageProvider`
protocol, and the errors a provider raises. Provider modules load only when used."""

from imagepipe.providers.base import (
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
from imagepipe.providers.simulated import Faults, SimulatedProvider, image_url, nominal_duration_ms

__all__ = [
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
