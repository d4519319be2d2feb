"""ASGI wrappers only, each `def name(app, **collaborators) -> ASGIApp`: errors, tracing, metrics (and the request
log), auth, limit. The top layer below app.py: may import anything beneath it; nothing imports them but app.py."""
