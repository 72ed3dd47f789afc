// The inference log (GET /admin/requests): one row per request, newest first, filtered by model,
// route, key, status and time, a page at a time. The filters live in the page's address, so the
// experiments page can link to one version's requests.

import { admin, queryString } from "../api.js";
import { field, formatInt, formatSeconds, formatTime, h, tableHead } from "../dom.js";

const FILTERS = ["model", "route", "key_id", "status", "since", "until"];
const SIZES = [10, 20, 50, 100];
const COLUMNS = [
  "Time (UTC)",
  "Request",
  "Key",
  "Model",
  "Route",
  "Engine",
  "Status",
  "Stream",
  "Prompt",
  "Completion",
  "TTFT",
  "Duration",
  "Finish",
  "Batch",
];

// datetime-local, to the millisecond (a link from the experiments page gives exact bounds); no
// zone: the form says UTC, and the API reads a naive time as UTC.
const toInput = (text) => (text ? text.replace(/Z$/, "").slice(0, 23) : "");

export async function render(view, ctx) {
  const q = ctx.query;
  const cursors = [null]; // `after` of each page seen: back is one step up this stack
  let page = null;

  const inputs = {
    model: h("select", { name: "model" }, h("option", { value: "" }, "any")),
    route: h("input", { type: "text", name: "route", placeholder: "v1", maxlength: 256, value: q.get("route") || "" }),
    key_id: h("input", { type: "text", name: "key_id", maxlength: 256, value: q.get("key_id") || "" }),
    status: h("input", { type: "number", name: "status", min: 100, max: 599, step: 1, value: q.get("status") || "" }),
    since: h("input", { type: "datetime-local", name: "since", step: 0.001, value: toInput(q.get("since")) }),
    until: h("input", { type: "datetime-local", name: "until", step: 0.001, value: toInput(q.get("until")) }),
  };
  const size = h(
    "select",
    { name: "limit" },
    SIZES.map((n) => h("option", { value: n, selected: String(n) === (q.get("limit") || "20") }, n)),
  );
  const submit = h("button", { type: "submit", class: "primary" }, "Apply");
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter requests" },
    field("Model", inputs.model),
    field("Route", inputs.route),
    field("Key ID", inputs.key_id),
    field("Status", inputs.status),
    field("From (UTC)", inputs.since),
    field("To (UTC)", inputs.until),
    field("Per page", size),
    h("div", { class: "field button-field" }, submit),
  );
  const count = h("p", { class: "hint", role: "status" });
  const tableBody = h("tbody");
  const newer = h("button", { type: "button", disabled: true, onclick: () => turn(-1) }, "← Newer");
  const older = h("button", { type: "button", disabled: true, onclick: () => turn(1) }, "Older →");
  view.append(
    h("h1", null, "Requests"),
    h(
      "p",
      { class: "hint" },
      "The inference log: one row per request that passed authentication, batch lines included.",
    ),
    form,
    count,
    h(
      "div",
      { class: "scroll" },
      h("table", { class: "data compact requests", "aria-label": "Requests" }, tableHead(COLUMNS), tableBody),
    ),
    h("div", { class: "pager" }, newer, older),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    cursors.splice(1);
    load();
  });

  function filters() {
    const out = {};
    for (const name of FILTERS) out[name] = inputs[name].value.trim();
    return out;
  }

  function row(r) {
    return h(
      "tr",
      { dataset: { id: r.id }, class: r.status >= 400 ? "failed" : null },
      h("td", null, formatTime(r.time).replace(" UTC", "")),
      h("td", null, h("code", null, r.request_id)),
      h(
        "td",
        null,
        r.key_id ? h("a", { href: `#/keys/${encodeURIComponent(r.key_id)}` }, h("code", null, r.key_id)) : "–",
      ),
      h("td", null, r.model),
      h("td", null, r.route ?? "–"),
      h("td", null, r.engine ?? "–"),
      h("td", { class: "num" }, String(r.status), r.error_code ? h("div", { class: "hint" }, r.error_code) : null),
      h("td", null, r.stream ? "yes" : "no"),
      h("td", { class: "num" }, formatInt(r.prompt_tokens)),
      h("td", { class: "num" }, formatInt(r.completion_tokens)),
      h("td", { class: "num" }, formatSeconds(r.ttft)),
      h("td", { class: "num" }, formatSeconds(r.duration)),
      h("td", null, r.finish_reason ?? "–"),
      h("td", null, r.batch_id ? h("code", null, r.batch_id) : ""),
    );
  }

  async function load() {
    const chosen = filters();
    history.replaceState(null, "", `#/requests${queryString({ ...chosen, limit: size.value })}`);
    submit.disabled = true;
    try {
      const after = cursors[cursors.length - 1];
      page = await admin.get(`admin/requests${queryString({ ...chosen, limit: size.value, after })}`);
      ctx.notices.clear("requests");
      tableBody.replaceChildren(...page.data.map(row));
      if (!page.data.length)
        tableBody.append(h("tr", null, h("td", { colspan: COLUMNS.length, class: "empty" }, "No request matches.")));
      const shown = page.data.length;
      count.textContent = `Page ${cursors.length}: ${shown} request${shown === 1 ? "" : "s"}${page.has_more ? ", more on older pages" : ""}.`;
    } catch (err) {
      if (ctx.signal.aborted) return;
      ctx.notices.error(err, "requests");
      page = null;
      tableBody.replaceChildren(
        h(
          "tr",
          null,
          h(
            "td",
            { colspan: COLUMNS.length, class: "empty" },
            "The requests could not be loaded (see the message above).",
          ),
        ),
      );
      count.textContent = "";
    } finally {
      submit.disabled = false;
      newer.disabled = cursors.length === 1;
      older.disabled = !(page && page.has_more);
    }
  }

  function turn(step) {
    if (step > 0 && page && page.last_id !== null) cursors.push(page.last_id);
    else if (step < 0 && cursors.length > 1) cursors.pop();
    load();
  }

  let models = [];
  try {
    models = (await admin.get("admin/models")).data.map((m) => m.id);
  } catch (err) {
    ctx.notices.error(err, "models"); // the log can still be read
  }
  const wanted = q.get("model") || "";
  for (const m of new Set([...models, ...(wanted ? [wanted] : [])]))
    inputs.model.append(h("option", { value: m, selected: m === wanted }, m));
  await load();
}
