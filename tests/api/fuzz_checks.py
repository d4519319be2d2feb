"""schemathesis hooks for tests/api/test_openapi_fuzz.py (SCHEMATHESIS_HOOKS): its "schema-valid request accepted"
check, except where the request breaks a rule no schema can state."""

import schemathesis
from schemathesis.specs.openapi.checks import ensure_resource_availability, positive_data_acceptance

# What a schema cannot say, in the messages of the 400s that say it: a prompt longer than the model's context (in
# every context_length_exceeded error); a value that must equal another field's: a tool_choice naming a function
# the request's tools do not have, a function call's output whose call_id no earlier call has, a page cursor that
# is not an item of that response.
BEYOND_A_SCHEMA = ("the model's context", "which is not among the tools", "comes before this output",
                   "no input item")


@schemathesis.check
def positive_data_acceptance_within_context(ctx, response, case):
    """A schema-valid request must be accepted, unless its prompt is longer than the model's context (the sum of
    every message, tool and example measured in the model's tokens) or its tool_choice names a tool it does not
    send (or a function output answers no call): 400s no document can foresee, which Anthropic's and OpenAI's own APIs answer with a 400 too."""
    if response.status_code == 400 and any(why in response.text for why in BEYOND_A_SCHEMA):
        return None
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def stored_resource_availability(ctx, response, case):
    """A response just created can be read, listed and deleted, if it was stored: one made with `"store": false`
    is a 404 by design, which the links from POST /v1/responses cannot say."""
    parent = ctx.internals.find_parent(case_id=case.id)
    if parent is not None and isinstance(parent.body, dict) and parent.body.get("store") is False:
        return None
    return ensure_resource_availability(ctx, response, case)
