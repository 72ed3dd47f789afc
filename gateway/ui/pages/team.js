// One team: its limits and budgets (an admin changes them), today's and this month's use against
// them, its spend per day as a chart (from the store's hourly rollups) and per model, and its keys.

import { admin, queryString, session } from "../api.js";
import { COLORS, PALETTE, categoryBars } from "../charts.js";
import { formatInt, h, tableHead } from "../dom.js";
import { groupFields, groupSummary } from "./teams.js";

const DAYS = 30;

export async function render(view, ctx) {
  const id = ctx.params.id;
  const path = `admin/teams/${encodeURIComponent(id)}`;
  const charts = [];
  ctx.onLeave(() => charts.splice(0).forEach((c) => c.destroy()));
  const since = new Date(Date.now() - (DAYS - 1) * 86400_000).toISOString().slice(0, 10);

  let team;
  let usage;
  let byDay;
  let byModel;
  let keys;
  try {
    [team, usage, byDay, byModel, keys] = await Promise.all([
      admin.get(path),
      admin.get(`${path}/usage`),
      admin.get(`admin/spend${queryString({ group_by: "day", team: id, since })}`),
      admin.get(`admin/spend${queryString({ group_by: "model", team: id, since })}`),
      admin.get(`${path}/keys`),
    ]);
  } catch (err) {
    view.append(h("p", null, h("a", { href: "#/teams" }, "← All teams")), h("h1", null, "Team"));
    ctx.notices.error(err, "load");
    return;
  }
  const currency = byDay.currency;
  const days = [];
  const found = new Map(byDay.data.map((row) => [row.day, row]));
  for (let i = DAYS - 1; i >= 0; i--) {
    const date = new Date(Date.now() - i * 86400_000).toISOString().slice(0, 10);
    days.push({ date, spend: 0, requests: 0, ...(found.get(date) || {}) });
  }
  const spendChart = h("div", { class: "chart", role: "img", "aria-label": `Spend per day in ${currency}` });
  const modelChart = h("div", { class: "chart", role: "img", "aria-label": `Spend per model in ${currency}` });
  const money = (x) => `${(x || 0).toFixed(4)} ${currency}`;
  const against = (used, limit) => (limit === null || limit === undefined ? "" : ` of ${limit}`);

  view.append(
    h("p", null, h("a", { href: "#/teams" }, "← All teams")),
    h("div", { class: "page-head" }, h("h1", null, team.name)),
    h("p", { class: "hint" }, `${team.id}${team.org ? ` · organization ${team.org}` : ""} · ${groupSummary(team)}`),
    h(
      "div",
      { class: "stats", role: "group", "aria-label": "Use today and this month" },
      h("p", { id: "team-spend-today" }, `Spend today: ${money(usage.day.spend)}${against(usage.day.spend, team.daily_budget)}`),
      h("p", null, `Spend this month: ${money(usage.month.spend)}${against(usage.month.spend, team.monthly_budget)}`),
      h("p", null, `Requests today: ${formatInt(usage.day.requests)}`),
      h("p", null, `Tokens today: ${formatInt(usage.day.tokens)}`),
    ),
    h("h2", null, `Spend per day (${currency}, UTC)`),
    spendChart,
    h("p", { class: "hint", id: "team-spend-total" }, `Last ${DAYS} days: ${money(byDay.total.spend)}, ${formatInt(byDay.total.requests)} requests`),
    h("h2", null, "Spend per model"),
    modelChart,
    h(
      "table",
      { class: "data compact" },
      tableHead(["Model", "Requests", "Prompt tokens", "Completion tokens", `Spend (${currency})`]),
      h(
        "tbody",
        null,
        byModel.data.map((row) =>
          h(
            "tr",
            null,
            h("td", null, row.model),
            [row.requests, row.prompt_tokens, row.completion_tokens].map((n) => h("td", { class: "num" }, formatInt(n))),
            h("td", { class: "num" }, row.spend.toFixed(6)),
          ),
        ),
      ),
    ),
    h("h2", null, "Keys"),
    h(
      "table",
      { class: "data compact" },
      tableHead(["Name", "ID", "State"]),
      h(
        "tbody",
        null,
        keys.data.map((k) =>
          h(
            "tr",
            null,
            h("td", null, h("a", { href: `#/keys/${encodeURIComponent(k.id)}` }, k.name)),
            h("td", { class: "mono" }, k.id),
            h("td", null, k.revoked ? "revoked" : "active"),
          ),
        ),
      ),
    ),
  );
  charts.push(
    // not dayBars: its axis counts whole numbers, and spend is money
    categoryBars(
      spendChart,
      days.map((d) => d.date.slice(5)),
      [{ label: `spend (${currency})`, color: COLORS.tokens, values: days.map((d) => d.spend || 0) }],
      { legendLabel: "day (UTC)", every: 3, format: (x) => x.toFixed(3) },
    ),
    categoryBars(
      modelChart,
      byModel.data.map((r) => r.model),
      [{ label: `spend (${currency})`, color: PALETTE[0], values: byModel.data.map((r) => r.spend) }],
      { legendLabel: "model", format: (x) => x.toFixed(3) },
    ),
  );

  if (session.role() === "admin") {
    const limits = groupFields(team);
    const status = h("p", { class: "form-error", role: "alert" });
    const form = h(
      "form",
      { class: "card", "aria-label": "Change limits" },
      h("h2", null, "Limits and budgets"),
      ...limits.fields,
      status,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await admin.patch(path, limits.read());
        ctx.navigate(`teams/${encodeURIComponent(id)}`, { text: "Saved." });
      } catch (err) {
        status.textContent = err.message;
      }
    });
    view.append(form);
  }
}
