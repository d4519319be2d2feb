"""OpenAI's Responses API, /v1/responses: schemas.py (the body, input items, tools and every field's fate),
translate.py (a request and the stored conversation it continues into the OpenAI chat request they mean, then
openai/translate.py's GenerationRequest: one pipeline), render.py (a response object, or its typed SSE events),
routes.py (the handlers; stored responses live in serving/conversations.py). Errors are OpenAI's."""
