"""The agent-era APIs as translations to and from chat completions: OpenAI's Responses API
(`responses.py`) and Anthropic's Messages API (`messages.py`).

Pure: no I/O, no engines, no store. A route parses the client's body here into a translation
object; the exchange (gateway/proxy/) asks it for the engine's body (translated to chat
completions, or the client's own where the engine serves the API itself) and hands it the
engine's answer, whole or as SSE blocks, to turn back into the API's shape. `chat.py` reads chat
answers and chunks for both; `base.py` is what the exchange sees of a translation.

May import gateway.core only.
"""
