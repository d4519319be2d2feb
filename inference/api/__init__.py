"""The HTTP APIs, one module or package per dialect (native /api/v1, OpenAI /v1, the tokenizer, the service's own
endpoints): each owns its schemas, its translation into a GenerationRequest and its rendering, errors included.
Imports serving and everything below it; never middleware or app."""
