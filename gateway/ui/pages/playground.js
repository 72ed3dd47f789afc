// Playground: chat with a model through the gateway as a client would, with a client key
// (sk-gw-..., kept in this tab's sessionStorage only; none when the gateway runs without auth).
// Streams the answer (tokens shown as they arrive), then the usage and the route that answered.
// The API selector speaks chat completions, the Responses API or Anthropic's Messages API (each
// with its own request and event stream; see API_CALLS below), to the same models.

import { ApiError, clientModels, errorFrom, send, session } from "../api.js";
import { describeError, field, formatInt, h } from "../dom.js";
import { readEvents } from "../sse.js";

export async function render(view, ctx) {
  const history = []; // the conversation so far: {role, content}
  let running = null; // the AbortController of the answer being streamed

  const keyInput = h("input", {
    type: "password",
    name: "client-key",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "sk-gw-…",
  });
  keyInput.value = session.clientKey();
  const loadModels = h("button", { type: "button" }, "Load models");
  const modelSelect = h("select", { name: "model", required: true });
  const remembered = session.model(); // the last choice in this tab, offered even before a list loads
  modelSelect.append(
    remembered ? h("option", { value: remembered }, remembered) : h("option", { value: "" }, "load the models first"),
  );
  const apiSelect = h(
    "select",
    { name: "api" },
    ...Object.entries(API_CALLS).map(([value, call]) => h("option", { value }, call.label)),
  );
  const maxTokens = h("input", { type: "number", name: "max-tokens", min: 1, step: 1, value: "128" });
  const extra = h("input", { type: "text", name: "extra", spellcheck: "false", placeholder: '{"temperature": 0.7}' });
  const transcript = h("ol", { class: "transcript", "aria-label": "Conversation", "aria-live": "polite" });
  const prompt = h("textarea", { name: "message", rows: 3, required: true, placeholder: "Say something to the model" });
  const sendButton = h("button", { type: "submit", class: "primary" }, "Send");
  const stopButton = h("button", { type: "button", disabled: true }, "Stop");
  const resetButton = h("button", { type: "button", class: "quiet" }, "New conversation");

  view.append(
    h("h1", null, "Playground"),
    h(
      "form",
      { class: "card settings", "aria-label": "Client settings", onsubmit: (e) => e.preventDefault() },
      h(
        "div",
        { class: "grid" },
        field("Client key", keyInput, "Empty when the gateway runs without auth. Kept in this tab only."),
        h("div", { class: "field button-field" }, loadModels),
        field("Model", modelSelect),
        field("API", apiSelect, "How the request is sent: the answer is the same model's."),
        field("Max tokens", maxTokens),
        field("Other parameters (JSON)", extra, "Merged into the request body."),
      ),
    ),
    transcript,
    h(
      "form",
      { class: "card composer", "aria-label": "Send a message", onsubmit: onSend },
      field("Message", prompt),
      h("div", { class: "actions" }, resetButton, stopButton, sendButton),
    ),
  );

  keyInput.addEventListener("change", () => session.setClientKey(keyInput.value.trim()));
  modelSelect.addEventListener("change", () => session.setModel(modelSelect.value));
  loadModels.addEventListener("click", () => fetchModels(true));
  stopButton.addEventListener("click", () => running && running.abort());
  resetButton.addEventListener("click", () => {
    if (running) running.abort();
    history.length = 0;
    transcript.replaceChildren();
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      event.target.form.requestSubmit();
    }
  });
  ctx.onLeave(() => running && running.abort());

  async function fetchModels(loud) {
    session.setClientKey(keyInput.value.trim());
    try {
      const models = await clientModels(keyInput.value.trim());
      const chosen = modelSelect.value;
      modelSelect.replaceChildren(...models.map((m) => h("option", { value: m, selected: m === chosen }, m)));
      if (!models.length) modelSelect.append(h("option", { value: "" }, "this key may use no model"));
      if (modelSelect.value) session.setModel(modelSelect.value);
      ctx.notices.clear("models");
      if (loud)
        ctx.notices.success(`${models.length} model${models.length === 1 ? "" : "s"} available to this key.`, "models");
    } catch (err) {
      // Quiet only when no key was given yet (under auth that is a 401 anyone expects).
      if (loud || keyInput.value.trim() || err.status !== 401) ctx.notices.error(err, "models");
    }
  }

  function message(role, text) {
    const body = h("div", { class: "text" }, text);
    const meta = h("div", { class: "meta" });
    const item = h(
      "li",
      { class: `msg ${role}`, dataset: { state: role === "assistant" ? "waiting" : "done" } },
      h("div", { class: "role" }, role === "user" ? "You" : "Model"),
      body,
      meta,
    );
    transcript.append(item);
    item.scrollIntoView({ block: "end" });
    return { item, body, meta };
  }

  async function onSend(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || running) return;
    if (!modelSelect.value) {
      ctx.notices.show("error", "Choose a model first (Load models).", "send");
      modelSelect.focus();
      return;
    }
    ctx.notices.clear("send");
    message("user", text);
    const turn = [...history, { role: "user", content: text }];
    const answer = message("assistant", "");
    prompt.value = "";
    running = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    try {
      const reply = await stream(turn, answer, running.signal);
      history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    } catch (err) {
      answer.item.classList.add("error");
      answer.item.setAttribute("role", "alert");
      answer.item.dataset.state = "error";
      answer.body.append(answer.body.textContent ? "\n" : "", describeError(err));
    } finally {
      running = null;
      sendButton.disabled = false;
      stopButton.disabled = true;
      prompt.focus();
    }
  }

  function extraParameters() {
    if (!extra.value.trim()) return {};
    let parsed;
    try {
      parsed = JSON.parse(extra.value);
    } catch (err) {
      throw new ApiError(0, "invalid_parameters", `Other parameters are not valid JSON: ${err.message}`);
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new ApiError(0, "invalid_parameters", "Other parameters must be a JSON object.");
    }
    return parsed;
  }

  async function stream(messages, answer, signal) {
    const call = API_CALLS[apiSelect.value] || API_CALLS.chat;
    const body = { ...extraParameters(), ...call.body(modelSelect.value, messages, Number(maxTokens.value) || undefined) };
    const response = await send("POST", call.path, { key: keyInput.value.trim(), body, signal });
    if (!response.ok) throw await errorFrom(response);
    const route = response.headers.get("x-gateway-route"); // which route version answered, where the gateway says
    const requestId = response.headers.get("x-request-id");
    answer.item.dataset.state = "streaming";
    answer.item.dataset.api = apiSelect.value;
    const seen = { reply: "", usage: null, finish: null };
    for await (const { data } of readEvents(response, signal)) {
      if (data === "[DONE]") break;
      let event;
      try {
        event = JSON.parse(data);
      } catch {
        throw new ApiError(response.status, "bad_stream", "The stream sent an event that is not JSON.");
      }
      const delta = call.read(event, seen, response.status);
      if (delta) {
        seen.reply += delta;
        answer.body.textContent = seen.reply;
      }
    }
    const { reply, usage, finish } = seen;
    if (signal.aborted) throw new DOMException("stopped", "AbortError");
    answer.item.dataset.state = "done";
    const parts = [];
    if (usage)
      parts.push(
        `${formatInt(usage.prompt_tokens)} prompt + ${formatInt(usage.completion_tokens)} completion = ${formatInt(usage.total_tokens)} tokens`,
      );
    if (finish) parts.push(`finished: ${finish}`);
    if (route) parts.push(`route: ${route}`);
    if (requestId) parts.push(`request ${requestId}`);
    answer.meta.textContent = parts.join(" · ");
    if (usage) answer.meta.dataset.usage = JSON.stringify(usage);
    if (route) answer.meta.dataset.route = route;
    return reply;
  }

  await fetchModels(false);
}

// Each API's request body and stream events: read() returns the text an event adds, and notes the
// usage ({prompt_tokens, completion_tokens, total_tokens}) and the finish reason in `seen`.
const API_CALLS = {
  chat: {
    label: "Chat completions",
    path: "v1/chat/completions",
    body: (model, messages, maxTokens) => ({
      model,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: maxTokens,
    }),
    read(chunk, seen, status) {
      if (chunk.error) throw new ApiError(status, chunk.error.code, chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.finish_reason) seen.finish = choice.finish_reason;
      if (chunk.usage) seen.usage = chunk.usage;
      return choice && choice.delta && choice.delta.content;
    },
  },
  responses: {
    label: "Responses",
    path: "v1/responses",
    body: (model, messages, maxTokens) => ({
      model,
      input: messages,
      stream: true,
      store: false,
      max_output_tokens: maxTokens,
    }),
    read(event, seen, status) {
      if (event.type === "error") throw new ApiError(status, event.code, event.message);
      if (event.type === "response.completed" || event.type === "response.incomplete") {
        const u = event.response.usage;
        if (u) seen.usage = { prompt_tokens: u.input_tokens, completion_tokens: u.output_tokens, total_tokens: u.total_tokens };
        seen.finish = event.response.status;
      }
      return event.type === "response.output_text.delta" ? event.delta : "";
    },
  },
  messages: {
    label: "Messages (Anthropic)",
    path: "v1/messages",
    body: (model, messages, maxTokens) => ({
      model,
      messages: messages.filter((m) => m.role !== "system"),
      system: messages.filter((m) => m.role === "system").map((m) => m.content).join("\n") || undefined,
      stream: true,
      max_tokens: maxTokens || 1024,
    }),
    read(event, seen, status) {
      if (event.type === "error") throw new ApiError(status, event.error.type, event.error.message);
      if (event.type === "message_start") seen.prompt = event.message.usage.input_tokens;
      if (event.type === "message_delta") {
        const prompt = event.usage.input_tokens ?? seen.prompt ?? 0;
        const completion = event.usage.output_tokens;
        seen.usage = { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
        seen.finish = event.delta.stop_reason;
      }
      const delta = event.type === "content_block_delta" && event.delta;
      return delta && delta.type === "text_delta" ? delta.text : "";
    },
  },
};
