// One key: its usage (per UTC day as charts, today and this month against the limits, and the
// current minute live), its limits to change, and revoking it.

import { admin } from "../api.js";
import { COLORS, dayBars, liveLines } from "../charts.js";
import { confirmDialog, formatInt, formatTime, h, tableHead } from "../dom.js";
import { changedFields, keyFields, limitSummary, stateOf } from "../keyfields.js";

const LIVE_MS = 2000;
const DAY_CHOICES = [7, 14, 30, 40];

export async function render(view, ctx) {
  const id = ctx.params.id;
  const path = `admin/keys/${encodeURIComponent(id)}`;
  const charts = []; // the per-day charts, redrawn when the number of days changes
  let live = null;
  ctx.onLeave(() => [...charts.splice(0), live].forEach((c) => c && c.destroy()));

  let key;
  let models;
  try {
    [key, models] = await Promise.all([admin.get(path), admin.get("admin/models")]);
  } catch (err) {
    view.append(h("p", null, h("a", { href: "#/keys" }, "← All keys")), h("h1", null, "Key"));
    ctx.notices.error(err, "load");
    return;
  }
  models = models.data.map((m) => m.id);

  const head = h("div", { class: "page-head" });
  const summary = h("p", { class: "hint" });
  const totals = h("div", { class: "stats", role: "group", "aria-label": "Usage today and this month" });
  const daysSelect = h(
    "select",
    { name: "days" },
    DAY_CHOICES.map((d) => h("option", { value: d, selected: d === 14 }, `${d} days`)),
  );
  const tokensChart = h("div", { class: "chart", role: "img", "aria-label": "Tokens per day" });
  const requestsChart = h("div", { class: "chart", role: "img", "aria-label": "Requests per day" });
  const liveChart = h("div", {
    class: "chart",
    role: "img",
    "aria-label": "Requests and tokens in the current minute",
  });
  const minuteText = h("p", { class: "hint", role: "status" });
  const historyTable = h("table", { class: "data compact" });
  const formSlot = h("div");

  view.append(
    h("p", null, h("a", { href: "#/keys" }, "← All keys")),
    head,
    summary,
    h(
      "section",
      { "aria-labelledby": "usage-title" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "usage-title" }, "Usage"),
        h("label", { class: "inline" }, "Show ", daysSelect),
      ),
      totals,
      h(
        "div",
        { class: "charts" },
        h("figure", null, tokensChart, h("figcaption", null, "Tokens per UTC day: prompt and completion")),
        h("figure", null, requestsChart, h("figcaption", null, "Requests per UTC day")),
        h(
          "figure",
          null,
          liveChart,
          minuteText,
          h("figcaption", null, "The current minute, live (the rpm and tpm window)"),
        ),
      ),
      h("details", null, h("summary", null, "Usage per day as a table"), historyTable),
    ),
    formSlot,
  );

  function showHead() {
    const state = stateOf(key);
    const revoke = h(
      "button",
      { type: "button", class: "danger", disabled: key.revoked, onclick: onRevoke },
      key.revoked ? "Revoked" : "Revoke key",
    );
    head.replaceChildren(h("h1", null, key.name, " ", h("span", { class: `badge ${state}` }, state)), revoke);
    summary.replaceChildren(
      h("code", null, key.id),
      ` · prefix `,
      h("code", null, `${key.prefix}…`),
      ` · ${limitSummary(key)} · models: ${key.models ? key.models.join(", ") : "all"}`,
      ` · created ${formatTime(key.created_at)} · expires ${formatTime(key.expires_at)}`,
      key.revoked ? ` · revoked ${formatTime(key.revoked_at)}` : "",
    );
  }

  function stat(label, used, limit) {
    const parts = [h("dt", null, label), h("dd", null, formatInt(used), limit ? ` of ${formatInt(limit)}` : "")];
    if (limit)
      parts.push(
        h(
          "dd",
          null,
          h("meter", {
            min: 0,
            max: limit,
            value: Math.min(used, limit),
            "aria-label": `${label}: ${used} of ${limit}`,
          }),
        ),
      );
    return h("dl", { class: "stat" }, parts);
  }

  let lastUsage = null;
  function showTotals(usage) {
    lastUsage = usage;
    totals.replaceChildren(
      stat("Requests today", usage.day.requests),
      stat("Tokens today", usage.day.tokens, key.daily_tokens),
      stat("Tokens this month", usage.month.tokens, key.monthly_tokens),
      stat("Requests this minute", usage.minute.requests, key.rpm),
      stat("Tokens this minute", usage.minute.tokens, key.tpm),
    );
  }

  async function loadUsage() {
    const usage = await admin.get(`${path}/usage?days=${daysSelect.value}`);
    showTotals(usage);
    for (const chart of charts.splice(0)) chart.destroy();
    tokensChart.replaceChildren();
    requestsChart.replaceChildren();
    charts.push(
      dayBars(tokensChart, usage.history, [
        { field: "prompt_tokens", label: "prompt tokens", color: COLORS.prompt },
        { field: "completion_tokens", label: "completion tokens", color: COLORS.completion },
      ]),
      dayBars(requestsChart, usage.history, [{ field: "requests", label: "requests", color: COLORS.requests }]),
    );
    historyTable.replaceChildren(
      tableHead(["Date (UTC)", "Requests", "Prompt tokens", "Completion tokens", "Tokens"]),
      h(
        "tbody",
        null,
        [...usage.history].reverse().map((d) =>
          h(
            "tr",
            null,
            h("td", null, d.date),
            [d.requests, d.prompt_tokens, d.completion_tokens, d.tokens].map((n) =>
              h("td", { class: "num" }, formatInt(n)),
            ),
          ),
        ),
      ),
    );
  }

  async function liveTick() {
    try {
      const usage = await admin.get(`${path}/usage`);
      ctx.notices.clear("live");
      showTotals(usage);
      if (live) live.push(Date.now() / 1000, [usage.minute.requests, usage.minute.tokens]);
      const { requests, tokens } = usage.minute;
      minuteText.textContent = `This minute: ${formatInt(requests)} request${requests === 1 ? "" : "s"}, ${formatInt(tokens)} tokens.`;
    } catch (err) {
      if (!ctx.signal.aborted) ctx.notices.error(err, "live");
    }
  }

  function showForm() {
    const fields = keyFields(key, models);
    const save = h("button", { type: "submit", class: "primary", disabled: key.revoked }, "Save changes");
    const form = h(
      "form",
      { class: "card", "aria-labelledby": "limits-title" },
      h("h2", { id: "limits-title" }, "Limits"),
      key.revoked ? h("p", { class: "hint" }, "A revoked key cannot be used; its limits no longer matter.") : null,
      fields.element,
      h("div", { class: "actions" }, save),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!form.reportValidity()) return;
      const changes = changedFields(key, fields.values());
      if (!Object.keys(changes).length) {
        ctx.notices.show("success", "Nothing changed.", "save");
        return;
      }
      save.disabled = true;
      try {
        key = await admin.patch(path, changes);
        ctx.notices.success(
          `Saved: ${Object.keys(changes).join(", ")}. It applies to the next request on every replica.`,
          "save",
        );
        showHead();
        showForm();
        if (lastUsage) showTotals(lastUsage); // against the new limits
      } catch (err) {
        ctx.notices.error(err, "save");
        save.disabled = false;
      }
    });
    formSlot.replaceChildren(form);
  }

  async function onRevoke() {
    const sure = await confirmDialog({
      title: `Revoke “${key.name}”?`,
      text: "Every request with this key fails from now on, on every replica. This cannot be undone; the record and its usage stay.",
      confirm: "Revoke",
      danger: true,
    });
    if (!sure) return;
    try {
      key = await admin.delete(path);
      ctx.notices.success(`Revoked “${key.name}”.`, "save");
      showHead();
      showForm();
    } catch (err) {
      ctx.notices.error(err, "save");
    }
  }

  showHead();
  showForm();
  live = liveLines(liveChart, [
    { label: "requests", color: COLORS.requests, scale: "left" },
    { label: "tokens", color: COLORS.tokens, scale: "right" },
  ]);
  daysSelect.addEventListener("change", () => loadUsage().catch((err) => ctx.notices.error(err, "usage")));
  try {
    await loadUsage();
  } catch (err) {
    ctx.notices.error(err, "usage");
  }
  await liveTick();
  ctx.every(LIVE_MS, liveTick);
}
