"""imagepipe: durable, parallel style variations of one prompt."""

__version__ = "0.1.0"
