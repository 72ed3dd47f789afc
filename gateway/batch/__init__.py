"""Batch inference: the OpenAI Files and Batches API on top of the store (gateway/store/).

- `objects`: File and Batch objects exactly as OpenAI renders them; completion windows.
- `jsonl`: an uploaded file's bytes as numbered lines, in bounded memory.
- `validate`: every line of an input file checked before a batch is created (all or nothing).
- `upload`: a multipart upload streamed into the store as it arrives.
- `dispatch`: one line through the interactive request path (gateway/proxy/exchange.py), no client.
- `runner` and `job`: any replica runs any batch under a lease; lines are claimed in small
  groups, and their results recorded in groups, so no crash loses or duplicates a line;
  `slots` bounds the lines a process has in flight.
- `cli`: `llm-gateway batch run FILE --wait` and friends.
"""
