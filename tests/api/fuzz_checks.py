"""schemathesis hooks for tests/api/test_openapi_fuzz.py (SCHEMATHESIS_HOOKS): its "schema-valid request accepted"
check, except where the model's context is the limit."""

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

CONTEXT_EXCEEDED = "the model's context"  # in the message of every context_length_exceeded error


@schemathesis.check
def positive_data_acceptance_within_context(ctx, response, case):
    """A schema-valid request must be accepted, unless its prompt is longer than the model's context: a 400 the
    document cannot foresee (the sum of every message, tool and example measured in the model's tokens), which
    Anthropic's and OpenAI's own APIs answer with a 400 too."""
    if response.status_code == 400 and CONTEXT_EXCEEDED in response.text:
        return None
    return positive_data_acceptance(ctx, response, case)
