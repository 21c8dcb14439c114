"""The version of the pipecat-hertz package."""

__version__ = "0.1.0"
