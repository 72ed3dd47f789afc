// Teams: each with its organization, limits and budgets; an admin creates them here. A team admin
// sees only its own teams (the gateway filters), a viewer sees all and changes nothing.

import { admin, session } from "../api.js";
import { field, formatInt, h, tableHead } from "../dom.js";

const LIMITS = [
  ["rpm", "Requests per minute"],
  ["tpm", "Tokens per minute"],
  ["max_concurrent", "Concurrent requests"],
  ["daily_tokens", "Tokens per day"],
  ["monthly_tokens", "Tokens per month"],
];
const BUDGETS = [
  ["daily_budget", "Budget per day"],
  ["monthly_budget", "Budget per month"],
];

/** "rpm 60 · budget/day 12.5" for a team's set limits. */
export function groupSummary(group) {
  const parts = [];
  for (const [name] of LIMITS) if (group[name] !== null && group[name] !== undefined) parts.push(`${name} ${formatInt(group[name])}`);
  for (const [name] of BUDGETS) {
    if (group[name] !== null && group[name] !== undefined) parts.push(`${name.replace("_budget", "")} budget ${group[name]}`);
  }
  return parts.join(" · ") || "no limits";
}

/** The inputs of a team's limits and budgets, filled from `group`; read() gives the changed fields. */
export function groupFields(group = {}) {
  const inputs = {};
  const fields = [];
  for (const [name, label] of [...LIMITS, ...BUDGETS]) {
    const money = name.endsWith("_budget");
    inputs[name] = h("input", {
      type: "number",
      name,
      min: money ? 0.000001 : 1,
      step: money ? "any" : 1,
      value: group[name] ?? "",
    });
    fields.push(field(label, inputs[name], money ? "in the pricing currency" : "empty: no limit"));
  }
  const read = () => {
    const out = {};
    for (const [name] of [...LIMITS, ...BUDGETS]) {
      const text = inputs[name].value.trim();
      const value = text === "" ? null : Number(text);
      if (value !== (group[name] ?? null)) out[name] = value;
    }
    return out;
  };
  return { fields, read };
}

export async function render(view, ctx) {
  const table = h("table", { class: "data" });
  const createSlot = h("div");
  const canCreate = session.role() === "admin";
  const createButton = h("button", { type: "button", class: "primary", hidden: !canCreate }, "Create team");
  view.append(
    h("div", { class: "page-head" }, h("h1", null, "Teams"), createButton),
    createSlot,
    table,
  );

  async function load() {
    const [teams, orgs] = await Promise.all([
      admin.get("admin/teams"),
      session.role() === "team_admin" ? Promise.resolve({ data: [] }) : admin.get("admin/orgs"),
    ]);
    const orgNames = new Map(orgs.data.map((o) => [o.id, o.name]));
    table.replaceChildren(
      tableHead(["Name", "ID", "Organization", "Limits"]),
      h(
        "tbody",
        null,
        teams.data.length
          ? teams.data.map((t) =>
              h(
                "tr",
                { dataset: { teamId: t.id } },
                h("td", null, h("a", { href: `#/teams/${encodeURIComponent(t.id)}` }, t.name)),
                h("td", { class: "mono" }, t.id),
                h("td", null, t.org ? orgNames.get(t.org) || t.org : "–"),
                h("td", null, groupSummary(t)),
              ),
            )
          : h("tr", null, h("td", { colspan: 4, class: "hint" }, "No teams yet.")),
      ),
    );
    return orgs.data;
  }

  createButton.addEventListener("click", async () => {
    const orgs = await load();
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, autocomplete: "off" });
    const org = h(
      "select",
      { name: "org" },
      h("option", { value: "" }, "none"),
      orgs.map((o) => h("option", { value: o.id }, o.name)),
    );
    const limits = groupFields();
    const status = h("p", { class: "form-error", role: "alert" });
    const form = h(
      "form",
      { class: "card", "aria-label": "New team" },
      h("h2", null, "New team"),
      field("Name", name),
      field("Organization", org, "fixed once the team is made"),
      ...limits.fields,
      status,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create")),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const body = { name: name.value.trim(), ...limits.read() };
        if (org.value) body.org = org.value;
        const team = await admin.post("admin/teams", body);
        createSlot.replaceChildren();
        ctx.notices.success(`Team ${team.name} created.`);
        await load();
      } catch (err) {
        status.textContent = err.message;
      }
    });
    createSlot.replaceChildren(form);
    name.focus();
  });

  try {
    await load();
  } catch (err) {
    ctx.notices.error(err, "load");
  }
}
