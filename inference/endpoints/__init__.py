"""HTTP handlers, grouped by API surface; each module exposes `routes(...) -> list[Route]`."""
