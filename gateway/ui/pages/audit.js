// The audit log (GET /admin/audit): every admin change, newest first — who (and as what role,
// signed in how, from where), what, and the record before and after. Secrets never reach it.

import { admin, queryString } from "../api.js";
import { formatTime, h, tableHead } from "../dom.js";

function diff(before, after) {
  if (!before || !after) return "";
  const changed = Object.keys({ ...before, ...after }).filter(
    (k) => JSON.stringify(before[k]) !== JSON.stringify(after[k]),
  );
  return changed.map((k) => `${k}: ${JSON.stringify(before[k])} → ${JSON.stringify(after[k])}`).join("; ");
}

export async function render(view, ctx) {
  const table = h("table", { class: "data" });
  const more = h("button", { type: "button", hidden: true }, "Older");
  view.append(h("div", { class: "page-head" }, h("h1", null, "Audit log")), table, more);
  const rows = h("tbody");
  table.replaceChildren(tableHead(["Time (UTC)", "Who", "Role", "Via", "From", "Action", "Target", "Change"]), rows);
  let after = null;

  async function page() {
    const body = await admin.get(`admin/audit${queryString({ limit: 50, after })}`);
    for (const e of body.data) {
      rows.append(
        h(
          "tr",
          { dataset: { auditId: e.id } },
          h("td", null, formatTime(e.time)),
          h("td", null, e.actor),
          h("td", null, e.role),
          h("td", null, e.via),
          h("td", { class: "mono" }, e.address),
          h("td", null, e.action),
          h("td", { class: "mono" }, e.target),
          h("td", null, diff(e.before, e.after) || (e.after ? "created" : "deleted")),
        ),
      );
    }
    after = body.data.length ? body.data[body.data.length - 1].id : after;
    more.hidden = !body.has_more;
  }
  more.addEventListener("click", () => page().catch((err) => ctx.notices.error(err, "load")));
  try {
    await page();
  } catch (err) {
    ctx.notices.error(err, "load");
  }
}
