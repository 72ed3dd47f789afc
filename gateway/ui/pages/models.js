// Models and engines: each model's routes (versions: engines, upstream model, weight) to edit,
// extend, trim and roll back to the config; and the engines' health and load, refreshed live.

import { admin } from "../api.js";
import { clear, confirmDialog, formatInt, formatPercent, h, tableHead, uid } from "../dom.js";

const LIVE_MS = 2000;

const describeRoute = (r) => `${r.name ? `${r.name}: ` : ""}${r.engines.join("+")} → ${r.model} (weight ${r.weight})`;

export async function render(view, ctx) {
  const modelsSlot = h("div", { class: "models-list" });
  const engineRows = h("tbody");
  const updated = h("p", { class: "hint", role: "status" });
  let engineNames = [];

  view.append(
    h("h1", null, "Models & engines"),
    h(
      "section",
      { "aria-labelledby": "engines-title" },
      h("div", { class: "section-head" }, h("h2", { id: "engines-title" }, "Engines"), updated),
      h(
        "table",
        { class: "data", "aria-labelledby": "engines-title" },
        tableHead(["Engine", "Kind", "URL", "Health", "Outstanding", "Waiting", "Running", "KV cache", "Adapters"]),
        engineRows,
      ),
      h(
        "p",
        { class: "hint" },
        "Outstanding: requests this gateway process has in flight there. Waiting, running and KV cache: what the engine reports on its /metrics. Adapters: the LoRA adapters it holds (of max_loras), with this process's requests in flight on each.",
      ),
    ),
    h(
      "section",
      { "aria-labelledby": "routes-title" },
      h("h2", { id: "routes-title" }, "Routes"),
      h(
        "p",
        { class: "hint" },
        "Requests for a model go to its routes in proportion to their weights (weight 0: none). A change applies to every replica at once, without a restart; roll back returns to the config file's routes.",
      ),
      modelsSlot,
    ),
  );

  async function refreshEngines() {
    let engines;
    try {
      engines = (await admin.get("admin/engines")).data;
    } catch (err) {
      if (ctx.signal.aborted) return;
      ctx.notices.error(err, "engines");
      updated.textContent = "Not updated: see the message above.";
      return;
    }
    ctx.notices.clear("engines");
    engineNames = engines.map((e) => e.name);
    engineRows.replaceChildren(
      ...engines.map((e) =>
        h(
          "tr",
          { dataset: { engine: e.name } },
          h("th", { scope: "row" }, e.name),
          h("td", null, e.kind),
          h("td", null, h("code", null, e.url)),
          h(
            "td",
            null,
            h("span", { class: `badge ${e.healthy ? "active" : "revoked"}` }, e.healthy ? "healthy" : "down"),
          ),
          h("td", { class: "num" }, formatInt(e.outstanding)),
          h("td", { class: "num" }, formatInt(e.waiting)),
          h("td", { class: "num" }, formatInt(e.running)),
          h(
            "td",
            null,
            h("meter", { min: 0, max: 1, value: e.kv_usage, "aria-label": `KV cache of ${e.name}` }),
            " ",
            formatPercent(e.kv_usage),
          ),
          h("td", null, adapterCell(e)),
        ),
      ),
    );
    if (!engines.length)
      engineRows.append(h("tr", null, h("td", { colspan: 9, class: "empty" }, "No engines configured.")));
    updated.textContent = `Live, every ${LIVE_MS / 1000} s · updated ${new Date().toISOString().slice(11, 19)} UTC`;
  }

  // The adapters an engine holds (absent when the config has no `adapters:` section).
  function adapterCell(e) {
    if (!e.adapters) return "–";
    const held = e.adapters.map((a) => `${a.name}${a.in_flight ? ` (${a.in_flight})` : ""}`).join(", ");
    return `${held || "none"} · ${e.adapters.length}/${e.max_loras}`;
  }

  // Routes carry a version name (x-gateway-route, metrics) where the gateway has them: then it is
  // shown, edited and sent back, so removing v1 never renames v2.
  const versioned = (model) => model.routes.some((r) => "name" in r);

  function routeRow(route, tbody, withName) {
    const names = [...new Set([...engineNames, ...route.engines])];
    const version = withName
      ? h("input", {
          type: "text",
          value: route.name || "",
          required: true,
          maxlength: 64,
          "aria-label": "Version",
          class: "version",
        })
      : null;
    const boxes = names.map((n) =>
      h("input", { type: "checkbox", value: n, checked: route.engines.includes(n), id: uid("eng") }),
    );
    const upstream = h("input", {
      type: "text",
      value: route.model,
      required: true,
      "aria-label": "Upstream model",
      class: "upstream",
    });
    const weight = h("input", {
      type: "number",
      min: 0,
      step: "any",
      value: String(route.weight),
      required: true,
      "aria-label": "Weight",
      class: "weight",
    });
    const share = h("td", { class: "num share" });
    const row = h(
      "tr",
      { class: "route" },
      withName ? h("td", null, version) : null,
      h(
        "td",
        null,
        h(
          "fieldset",
          { class: "inline-checks", "aria-label": "Engines" },
          boxes.map((b, i) => h("label", { class: "check", for: b.id }, b, names[i])),
        ),
      ),
      h("td", null, upstream),
      h("td", null, weight),
      share,
      h(
        "td",
        null,
        h(
          "button",
          {
            type: "button",
            class: "quiet",
            "aria-label": "Remove this route",
            onclick: () => {
              row.remove();
              shares(tbody);
            },
          },
          "Remove",
        ),
      ),
    );
    row.read = () => ({
      ...(withName ? { name: version.value.trim() } : {}),
      engines: boxes.filter((b) => b.checked).map((b) => b.value),
      model: upstream.value.trim(),
      weight: Number(weight.value),
    });
    weight.addEventListener("input", () => shares(tbody));
    return row;
  }

  function shares(tbody) {
    const rows = [...tbody.querySelectorAll("tr.route")];
    const weights = rows.map((r) => Math.max(0, Number(r.read().weight) || 0));
    const total = weights.reduce((a, b) => a + b, 0);
    rows.forEach((r, i) => (r.querySelector(".share").textContent = total ? formatPercent(weights[i] / total) : "–"));
  }

  function modelSection(model) {
    const withName = versioned(model);
    const tbody = h("tbody");
    const titleId = uid("model");
    const save = h("button", { type: "submit", class: "primary" }, "Save routes");
    const add = h("button", { type: "button" }, "Add route");
    const rollback = h("button", { type: "button", disabled: !model.overridden }, "Roll back to config");
    const form = h(
      "form",
      { class: "card", "aria-labelledby": titleId, dataset: { model: model.id } },
      h(
        "div",
        { class: "section-head" },
        h("h3", { id: titleId }, model.id),
        h(
          "span",
          { class: `badge ${model.overridden ? "changed" : "neutral"}` },
          model.overridden ? "changed at run time" : "as configured",
        ),
      ),
      h(
        "table",
        { class: "data routes" },
        tableHead([...(withName ? ["Version"] : []), "Engines", "Upstream model", "Weight", "Share", ""]),
        tbody,
      ),
      model.overridden
        ? h("p", { class: "hint" }, "Configured: ", model.configured_routes.map(describeRoute).join("; "))
        : null,
      h("div", { class: "actions" }, add, rollback, save),
    );
    for (const route of model.routes) tbody.append(routeRow(route, tbody, withName));
    shares(tbody);
    const path = `admin/models/${encodeURIComponent(model.id)}/routes`;

    add.addEventListener("click", () => {
      const last = model.routes[model.routes.length - 1];
      const taken = new Set([...tbody.querySelectorAll("tr.route")].map((r) => r.read().name));
      let next = tbody.querySelectorAll("tr.route").length + 1;
      while (taken.has(`v${next}`)) next += 1;
      const fresh = {
        name: `v${next}`,
        engines: last ? last.engines : [],
        model: last ? last.model : model.id,
        weight: 0,
      };
      const row = routeRow(fresh, tbody, withName);
      tbody.append(row);
      shares(tbody);
      row.querySelector("input.upstream").focus();
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!form.reportValidity()) return;
      const routes = [...tbody.querySelectorAll("tr.route")].map((r) => r.read());
      save.disabled = true;
      try {
        const changed = await admin.put(path, { routes });
        form.replaceWith(modelSection(changed));
        ctx.notices.success(
          `Saved the routes of ${model.id}: weights ${changed.routes.map((r) => r.weight).join(", ")}.`,
          `model-${model.id}`,
        );
      } catch (err) {
        ctx.notices.error(err, `model-${model.id}`);
        save.disabled = false;
      }
    });
    rollback.addEventListener("click", async () => {
      const sure = await confirmDialog({
        title: `Roll back ${model.id}?`,
        text: "Its routes return to those of the config file, on every replica.",
        confirm: "Roll back",
      });
      if (!sure) return;
      try {
        const restored = await admin.delete(path);
        form.replaceWith(modelSection(restored));
        ctx.notices.success(`Rolled ${model.id} back to the config's routes.`, `model-${model.id}`);
      } catch (err) {
        ctx.notices.error(err, `model-${model.id}`);
      }
    });
    return form;
  }

  await refreshEngines(); // first, so the route editors can offer every engine
  try {
    const models = (await admin.get("admin/models")).data;
    clear(modelsSlot).append(...models.map(modelSection));
    if (!models.length) modelsSlot.append(h("p", { class: "empty" }, "No models configured."));
  } catch (err) {
    ctx.notices.error(err, "models");
    modelsSlot.append(h("p", { class: "empty" }, "The models could not be loaded (see the message above)."));
  }
  ctx.every(LIVE_MS, refreshEngines);
}
