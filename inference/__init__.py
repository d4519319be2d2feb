"""An HTTP inference service for GGUF language models."""

__version__ = "0.1.0"
SERVICE_NAME = "inference"
