// The running configuration (GET /admin/config): its version, when it was loaded, how many reloads
// this process has seen, and every section as the gateway reads it, secrets masked. An admin may
// reload the file from here (POST /admin/reload): the outcome, or the refusal with its reasons.

import { admin } from "../api.js";
import { formatUnix, h } from "../dom.js";

export async function render(view, ctx) {
  const facts = h("dl", { class: "facts" });
  const sections = h("div", { class: "config-sections" });
  const reload = h("button", { type: "button" }, "Reload the file");
  view.append(
    h("div", { class: "page-head" }, h("h1", null, "Configuration"), reload),
    h(
      "p",
      { class: "hint" },
      "What this gateway runs now, as read from its configuration file (defaults filled in, secrets shown as ***). A reload reads the file again: a bad file is refused and nothing changes; a good one is taken by every worker and, through Redis, every replica.",
    ),
    facts,
    sections,
  );

  async function show() {
    const body = await admin.get("admin/config");
    const fact = (name, value, key) =>
      [h("dt", null, name), h("dd", { dataset: key ? { fact: key } : {}, class: "mono" }, value)];
    facts.replaceChildren(
      ...fact("Version", body.version, "version"),
      ...fact("Loaded", formatUnix(body.loaded_at)),
      ...fact("Reloads", String(body.reloads), "reloads"),
      ...fact("Previous version", body.previous || "–"),
      ...fact("File", body.source),
    );
    sections.replaceChildren(
      ...Object.entries(body.config).map(([name, value]) =>
        h(
          "details",
          { dataset: { section: name }, open: name === "models" },
          h("summary", null, name),
          h("pre", { class: "config-value" }, JSON.stringify(value, null, 2)),
        ),
      ),
    );
  }

  reload.addEventListener("click", async () => {
    reload.disabled = true;
    try {
      const outcome = await admin.post("admin/reload");
      const changed = outcome.changed.length ? ` (${outcome.changed.join(", ")})` : "";
      ctx.notices.success(
        outcome.status === "reloaded" ? `Reloaded: version ${outcome.version}${changed}.` : `Unchanged: version ${outcome.version}.`,
        "reload",
      );
      await show();
    } catch (err) {
      ctx.notices.error(err, "reload");
    } finally {
      reload.disabled = false;
    }
  });

  try {
    await show();
  } catch (err) {
    ctx.notices.error(err, "load");
  }
}
