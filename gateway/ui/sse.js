// Server-sent events read from a fetch() response body as they arrive (EventSource cannot POST
// nor send an Authorization header). Follows the SSE parsing rules that matter for OpenAI-style
// streams: events end at a blank line; "data:" lines join with "\n"; ":" lines are comments.

/** Yields {event, data} for each event of `response`'s body, as soon as it is complete. */
export async function* readEvents(response, signal) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const abort = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", abort);
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      // \r\n and \r end lines too; a \r at the very end may be half of a \r\n: keep it for later
      buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseEvent(block);
        if (parsed) yield parsed;
      }
    }
    const last = parseEvent(buffer); // a stream cut without its final blank line
    if (last) yield last;
  } finally {
    signal?.removeEventListener("abort", abort);
    reader.releaseLock();
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") data.push(value);
    else if (name === "event") event = value;
  }
  return data.length ? { event, data: data.join("\n") } : null;
}
