"""The upstream backend (MODEL_BACKEND=openai): client.py sends each request to the OpenAI-compatible upstream and
turns its refusals into ours; stream.py reads its OpenAI answers (SSE or whole); relay.py passes an answer in another
API (UPSTREAM_PASSTHROUGH) back as it came."""

from .client import UpstreamEngine
from .relay import UpstreamRelay
from .stream import UpstreamGeneration

__all__ = ["UpstreamEngine", "UpstreamGeneration", "UpstreamRelay"]
