"""Image providers behind one :class:`Provider` protocol. Only a simulated one so far."""

from imagepipe.providers.base import (
    GeneratedImage,
    ImageRequest,
    InvalidRequest,
    Provider,
    ProviderError,
    ProviderTimeout,
    TransientProviderError,
)
from imagepipe.providers.simulated import (
    DEFAULT_STYLES,
    KNOWN_STYLES,
    Faults,
    SimulatedProvider,
    image_url,
    nominal_duration_ms,
)

__all__ = [
    "DEFAULT_STYLES",
    "KNOWN_STYLES",
    "Faults",
    "GeneratedImage",
    "ImageRequest",
    "InvalidRequest",
    "Provider",
    "ProviderError",
    "ProviderTimeout",
    "SimulatedProvider",
    "TransientProviderError",
    "image_url",
    "nominal_duration_ms",
]
