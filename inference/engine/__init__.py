"""Engines: the Engine protocol (base), the embedded llama.cpp engine (llama), an OpenAI-compatible upstream (upstream)."""
