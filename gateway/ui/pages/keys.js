// Keys: the list with filters (name, state, model), and creating a key. A new key's secret is
// shown once, in this page only: it is dropped when the page is left and never stored.

import { admin } from "../api.js";
import { clear, field, formatTime, h, tableHead } from "../dom.js";
import { isActive, keyFields, limitSummary, stateOf } from "../keyfields.js";

export async function render(view, ctx) {
  let keys = [];
  let models = [];

  const nameFilter = h("input", { type: "search", name: "name-filter", placeholder: "part of a name or id" });
  const stateFilter = h(
    "select",
    { name: "state-filter" },
    h("option", { value: "" }, "all"),
    h("option", { value: "active" }, "active"),
    h("option", { value: "revoked" }, "revoked"),
    h("option", { value: "expired" }, "expired"),
  );
  const modelFilter = h("select", { name: "model-filter" }, h("option", { value: "" }, "any"));
  const count = h("p", { class: "hint", role: "status" });
  const tableBody = h("tbody");
  const table = h("table", { class: "data", "aria-label": "API keys" }, h("thead"), tableBody);
  const secretSlot = h("div");
  const createSlot = h("div");

  // enabled once the models are known: the form offers them
  const createButton = h(
    "button",
    { type: "button", class: "primary", disabled: true, onclick: () => openCreate() },
    "Create key",
  );
  view.append(
    h("div", { class: "page-head" }, h("h1", null, "API keys"), createButton),
    secretSlot,
    createSlot,
    h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter keys", onsubmit: (e) => e.preventDefault() },
      field("Name or ID", nameFilter),
      field("State", stateFilter),
      field("May use model", modelFilter),
    ),
    count,
    table,
  );
  for (const input of [nameFilter, stateFilter, modelFilter]) input.addEventListener("input", () => showRows());
  ctx.onLeave(() => clear(secretSlot)); // the secret is gone once you leave

  function matches(key) {
    const text = nameFilter.value.trim().toLowerCase();
    if (text && !key.name.toLowerCase().includes(text) && !key.id.includes(text)) return false;
    if (stateFilter.value && stateOf(key) !== stateFilter.value) return false;
    const model = modelFilter.value;
    return !model || key.models === null || key.models.includes(model);
  }

  function showRows() {
    const shown = keys.filter(matches);
    const extra = ["priority", "weight"].filter((f) => keys.some((k) => f in k));
    const extraTitles = extra.map((f) => f[0].toUpperCase() + f.slice(1));
    table.tHead.replaceWith(
      tableHead(["Name", "ID", "Prefix", "Models", "Limits", ...extraTitles, "Expires", "Created", "State"]),
    );
    tableBody.replaceChildren(
      ...shown.map((key) =>
        h(
          "tr",
          { dataset: { keyId: key.id } },
          h("td", null, h("a", { href: `#/keys/${encodeURIComponent(key.id)}` }, key.name)),
          h("td", null, h("code", null, key.id)),
          h("td", null, h("code", null, `${key.prefix}…`)),
          h("td", null, key.models ? key.models.join(", ") : "all"),
          h("td", null, limitSummary(key)),
          extra.map((f) => h("td", null, key[f] ?? "–")),
          h("td", null, formatTime(key.expires_at)),
          h("td", null, formatTime(key.created_at)),
          h("td", null, h("span", { class: `badge ${stateOf(key)}` }, stateOf(key))),
        ),
      ),
    );
    if (!shown.length) {
      const columns = 8 + extra.length;
      tableBody.append(
        h(
          "tr",
          null,
          h("td", { colspan: columns, class: "empty" }, keys.length ? "No key matches the filters." : "No keys yet."),
        ),
      );
    }
    const active = keys.filter(isActive).length;
    count.textContent = `${shown.length} of ${keys.length} keys shown · ${active} active`;
  }

  async function load() {
    const [list, modelList] = await Promise.all([admin.get("admin/keys"), admin.get("admin/models")]);
    keys = list.data;
    models = modelList.data.map((m) => m.id);
    const chosen = modelFilter.value;
    createButton.disabled = false;
    modelFilter.replaceChildren(
      h("option", { value: "" }, "any"),
      ...models.map((m) => h("option", { value: m, selected: m === chosen }, m)),
    );
    showRows();
  }

  function openCreate() {
    clear(secretSlot);
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, autocomplete: "off" });
    const fields = keyFields(null, models);
    const submit = h("button", { type: "submit", class: "primary" }, "Create");
    const cancel = h("button", { type: "button", onclick: () => clear(createSlot) }, "Cancel");
    const form = h(
      "form",
      { class: "card", "aria-labelledby": "create-title" },
      h("h2", { id: "create-title" }, "New key"),
      field("Name", name),
      fields.element,
      h("div", { class: "actions" }, cancel, submit),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!form.reportValidity()) return;
      const body = { name: name.value.trim() };
      for (const [k, v] of Object.entries(fields.values())) if (v !== null) body[k] = v;
      submit.disabled = true;
      try {
        const created = await admin.post("admin/keys", body);
        clear(createSlot);
        showSecret(created);
        await load();
      } catch (err) {
        ctx.notices.error(err, "create");
      } finally {
        submit.disabled = false;
      }
    });
    createSlot.replaceChildren(form);
    name.focus();
  }

  function showSecret(created) {
    const secret = h("code", { class: "secret", id: "new-secret" }, created.key);
    const copied = h("span", { class: "hint", role: "status" });
    const copy = async () => {
      try {
        await navigator.clipboard.writeText(created.key);
        copied.textContent = "Copied.";
      } catch {
        // no clipboard access (an insecure origin, a denied permission): select it for Ctrl+C
        getSelection().selectAllChildren(secret);
        copied.textContent = "Selected: press Ctrl+C to copy.";
      }
    };
    const panel = h(
      "section",
      { class: "card secret-panel", "aria-labelledby": "secret-title" },
      h("h2", { id: "secret-title" }, `Secret of the new key “${created.name}”`),
      h(
        "p",
        null,
        "Copy it now: it is shown only this once. The gateway keeps only its hash, so it cannot be shown again.",
      ),
      h(
        "div",
        { class: "secret-row" },
        secret,
        h("button", { type: "button", class: "primary", onclick: copy }, "Copy"),
        copied,
      ),
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", onclick: () => clear(secretSlot) }, "Done, I have copied it"),
      ),
    );
    secretSlot.replaceChildren(panel);
    panel.querySelector("button").focus();
  }

  async function firstLoad() {
    try {
      await load();
      ctx.notices.clear("load");
    } catch (err) {
      if (ctx.signal.aborted) return;
      ctx.notices.error(err, "load");
      const retry = h("button", { type: "button", onclick: firstLoad }, "Retry");
      tableBody.replaceChildren(
        h(
          "tr",
          null,
          h("td", { colspan: 8, class: "empty" }, "The keys could not be loaded (see the message above). ", retry),
        ),
      );
      table.tHead.replaceChildren();
    }
  }

  await firstLoad();
}
