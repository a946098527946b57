"""Llamaserve: one GGUF model served to many people, securely, over the OpenAI API."""

__version__ = "0.1.0"
