"""A model's `max_prompt_tokens`: a prompt over it is refused before any engine sees it.

An engine refuses a prompt longer than its context too, but only after it has read, parsed and
tokenized it: a 3.8 MB prompt held the bundled CPU engine for seconds, long enough for its
health check to time out and the gateway to take its only engine out. Here the prompt is counted
as for quota reservations (gateway/access/tokens.py, big prompts off the event loop) and the
count is kept on the request, so admission does not count it again. A body so big that no prompt
of the bound could take that many bytes is refused without counting at all.
"""

from __future__ import annotations

from gateway.access.tokens import PromptCounter
from gateway.core.errors import Code, invalid
from gateway.core.request import ApiRequest

# No token of any tokenizer takes more bytes of JSON than this (a JSON-escaped code point is 6
# bytes, an emoji 12): a body over limit * MAX_BYTES_PER_TOKEN holds more than `limit` tokens.
MAX_BYTES_PER_TOKEN = 32


async def bound_prompt(counter: PromptCounter, request: ApiRequest, limit: int) -> None:
    """Raises 400 context_length_exceeded when the request's prompt is over `limit` tokens."""
    param = request.endpoint.prompt_field
    if request.size > limit * MAX_BYTES_PER_TOKEN:
        raise invalid(
            f"The prompt is over {limit} tokens, this model's limit (the request has {request.size} bytes). "
            "Shorten the prompt.",
            param=param,
            code=Code.CONTEXT_LENGTH_EXCEEDED,
        )
    tokens = await counter.of(request)
    if tokens > limit:
        raise invalid(
            f"This model's prompt limit is {limit} tokens, but the prompt has {tokens} tokens. Shorten the prompt.",
            param=param,
            code=Code.CONTEXT_LENGTH_EXCEEDED,
        )
