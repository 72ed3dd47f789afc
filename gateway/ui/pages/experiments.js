// Experiments: a model's report over a window (GET /admin/models/{name}/report): its route
// versions side by side (volume, errors, latency, throughput, token sizes, finish reasons) as a
// table and charts, and drift against a baseline window (PSI per feature, flagged above 0.2).
// The choice of model and windows lives in the page's address, so a report can be shared.

import { admin, queryString } from "../api.js";
import { COLORS, PALETTE, categoryBars } from "../charts.js";
import { clear, field, formatInt, formatNumber, formatSeconds, formatTime, h, tableHead } from "../dom.js";

const WINDOWS = [
  [900, "Last 15 minutes"],
  [3600, "Last hour"],
  [6 * 3600, "Last 6 hours"],
  [86400, "Last 24 hours"],
  [7 * 86400, "Last 7 days"],
];
const DEFAULT_WINDOW = 3600;
const percent = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
const mix = (shares) =>
  Object.keys(shares).length
    ? Object.entries(shares)
        .map(([reason, share]) => `${reason} ${percent(share)}`)
        .join(" · ")
    : "–";

// The per-version rows: the report's field, how it reads, what it means.
const METRICS = [
  { field: "requests", label: "Requests", format: formatInt },
  { field: "errors", label: "Errors", format: formatInt, hint: "status 400 and above, except 499" },
  { field: "error_rate", label: "Error rate", format: percent },
  { field: "disconnects", label: "Client went away (499)", format: formatInt },
  { field: "ttft_p50", label: "Time to first token p50", format: formatSeconds, hint: "streams" },
  { field: "ttft_p95", label: "Time to first token p95", format: formatSeconds, hint: "streams" },
  { field: "latency_p50", label: "Latency p50", format: formatSeconds },
  { field: "latency_p95", label: "Latency p95", format: formatSeconds },
  { field: "output_tokens_per_second", label: "Output tokens/s", format: (x) => formatNumber(x, 1) },
  { field: "mean_prompt_tokens", label: "Mean prompt tokens", format: (x) => formatNumber(x, 1) },
  { field: "mean_completion_tokens", label: "Mean completion tokens", format: (x) => formatNumber(x, 1) },
  { field: "prompt_tokens", label: "Prompt tokens (all)", format: formatInt },
  { field: "completion_tokens", label: "Completion tokens (all)", format: formatInt },
  { field: "finish_reason_mix", label: "Finish reasons", format: mix },
];
const FEATURES = {
  prompt_tokens: "Prompt length (tokens)",
  completion_tokens: "Completion length (tokens)",
  finish_reason: "Finish reason",
};
const LATENCIES = [
  ["ttft_p50", "TTFT p50"],
  ["ttft_p95", "TTFT p95"],
  ["latency_p50", "latency p50"],
  ["latency_p95", "latency p95"],
];

// datetime-local holds "YYYY-MM-DDTHH:MM[:SS]" with no zone; the form says it is UTC, as the API
// reads a naive time.
const toInput = (text) => (text ? text.replace(/Z$/, "").slice(0, 19) : "");

function timeInput(name, value) {
  return h("input", { type: "datetime-local", name, step: 1, value: toInput(value) });
}

export async function render(view, ctx) {
  const q = ctx.query;
  const charts = [];
  const dropCharts = () => charts.splice(0).forEach((c) => c.destroy());
  ctx.onLeave(dropCharts);

  const modelSelect = h("select", { name: "model", required: true });
  const custom = q.get("since") !== null;
  const windowSelect = h(
    "select",
    { name: "window" },
    WINDOWS.map(([seconds, label]) =>
      h(
        "option",
        { value: seconds, selected: !custom && String(seconds) === (q.get("window") || `${DEFAULT_WINDOW}`) },
        label,
      ),
    ),
    h("option", { value: "custom", selected: custom }, "Custom…"),
  );
  const since = timeInput("since", q.get("since"));
  const until = timeInput("until", q.get("until"));
  const customBaseline = q.get("baseline_since") !== null;
  const baselineSelect = h(
    "select",
    { name: "baseline" },
    h("option", { value: "before", selected: !customBaseline }, "As long, just before the window"),
    h("option", { value: "custom", selected: customBaseline }, "Custom…"),
  );
  const baselineSince = timeInput("baseline_since", q.get("baseline_since"));
  const baselineUntil = timeInput("baseline_until", q.get("baseline_until"));
  const customFields = h("div", { class: "grid" }, field("From (UTC)", since), field("To (UTC)", until, "Empty: now."));
  const baselineFields = h(
    "div",
    { class: "grid" },
    field("Baseline from (UTC)", baselineSince),
    field("Baseline to (UTC)", baselineUntil),
  );
  const submit = h("button", { type: "submit", class: "primary" }, "Show report");
  const form = h(
    "form",
    { class: "card", "aria-label": "Report settings" },
    h(
      "div",
      { class: "grid" },
      field("Model", modelSelect),
      field("Window", windowSelect),
      field("Drift baseline", baselineSelect),
      h("div", { class: "field button-field" }, submit),
    ),
    customFields,
    baselineFields,
  );
  const report = h("div", { class: "report" });
  view.append(h("h1", null, "Experiments"), form, report);

  const showCustom = () => {
    customFields.hidden = windowSelect.value !== "custom";
    since.required = windowSelect.value === "custom";
    baselineFields.hidden = baselineSelect.value !== "custom";
    baselineSince.required = baselineUntil.required = baselineSelect.value === "custom";
  };
  windowSelect.addEventListener("change", showCustom);
  baselineSelect.addEventListener("change", showCustom);
  showCustom();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (form.reportValidity()) load().catch((err) => ctx.notices.error(err, "report"));
  });

  /** The page's choice as the page's own query (shareable) and as the API's. */
  function choice() {
    const own = { model: modelSelect.value };
    const api = {};
    if (windowSelect.value === "custom") {
      own.since = api.since = since.value;
      own.until = api.until = until.value;
    } else {
      own.window = windowSelect.value;
      api.since = new Date(Date.now() - Number(windowSelect.value) * 1000).toISOString();
    }
    if (baselineSelect.value === "custom") {
      own.baseline_since = api.baseline_since = baselineSince.value;
      own.baseline_until = api.baseline_until = baselineUntil.value;
    }
    return { own, api };
  }

  async function load() {
    const { own, api } = choice();
    history.replaceState(null, "", `#/experiments${queryString(own)}`);
    submit.disabled = true;
    try {
      const body = await admin.get(`admin/models/${encodeURIComponent(own.model)}/report${queryString(api)}`);
      ctx.notices.clear("report");
      showReport(body);
    } finally {
      submit.disabled = false;
    }
  }

  function showReport(r) {
    dropCharts();
    const requests = (route) =>
      `#/requests${queryString({ model: r.model, route: route === "-" ? null : route, since: r.window.since, until: r.window.until })}`;
    clear(report).append(
      h(
        "p",
        { class: "hint", dataset: { window: `${r.window.since} ${r.window.until}` } },
        `${r.model}: ${formatTime(r.window.since)} to ${formatTime(r.window.until)}; drift against ${formatTime(r.baseline.since)} to ${formatTime(r.baseline.until)}.`,
      ),
      h("h2", { id: "versions-title" }, "Versions side by side"),
      r.routes.length
        ? versionsTable(r, requests)
        : h("p", { class: "empty" }, "No requests for this model in the window."),
    );
    const figures = h("div", { class: "charts" });
    if (r.routes.length) report.append(figures);
    const driftSection = h("section", { "aria-labelledby": "drift-title" }, h("h2", { id: "drift-title" }, "Drift"));
    report.append(driftSection);
    if (r.routes.length) versionCharts(r, figures);
    showDrift(r, driftSection);
  }

  function versionsTable(r, requests) {
    const names = r.routes.map((v) => v.route);
    return h(
      "table",
      { class: "data versions", "aria-labelledby": "versions-title" },
      tableHead(["", ...names.map((n) => (n === "-" ? "no route (refused first)" : n))]),
      h(
        "tbody",
        null,
        METRICS.map((m) =>
          h(
            "tr",
            { dataset: { field: m.field } },
            h("th", { scope: "row" }, m.label, m.hint ? h("small", { class: "hint" }, ` (${m.hint})`) : null),
            r.routes.map((v) =>
              h(
                "td",
                { class: "num", dataset: { route: v.route, value: JSON.stringify(v[m.field]) } },
                m.format(v[m.field]),
              ),
            ),
          ),
        ),
        h(
          "tr",
          null,
          h("th", { scope: "row" }, "Inference log"),
          r.routes.map((v) => h("td", { class: "num" }, h("a", { href: requests(v.route) }, "its requests"))),
        ),
      ),
    );
  }

  function figure(caption, label) {
    const el = h("div", { class: "chart", role: "img", "aria-label": label });
    return [el, h("figure", null, el, h("figcaption", null, caption))];
  }

  function versionCharts(r, figures) {
    const names = r.routes.map((v) => v.route);
    const [latency, latencyFigure] = figure("Latency and time to first token per version (ms)", "Latency per version");
    const [finish, finishFigure] = figure(
      "Finish reasons per version (share of successful requests)",
      "Finish reasons",
    );
    figures.append(latencyFigure, finishFigure);
    charts.push(
      categoryBars(
        latency,
        names,
        LATENCIES.map(([f, label], i) => ({
          label,
          color: PALETTE[i],
          values: r.routes.map((v) => (v[f] === null ? null : v[f] * 1000)),
        })),
        { format: (t) => `${formatNumber(t, 1)}`, legendLabel: "version" },
      ),
    );
    const reasons = [...new Set(r.routes.flatMap((v) => Object.keys(v.finish_reason_mix)))].sort();
    charts.push(
      categoryBars(
        finish,
        names,
        reasons.map((reason, i) => ({
          label: reason,
          color: PALETTE[i % PALETTE.length],
          values: r.routes.map((v) => v.finish_reason_mix[reason] ?? 0),
        })),
        { format: (t) => `${Math.round(t * 100)}%`, max: 1, legendLabel: "version" },
      ),
    );
  }

  function flag(d) {
    if (d.psi === null) return h("span", { class: "badge neutral" }, "not enough traffic");
    if (d.drifted) return h("span", { class: "badge revoked drift-flag" }, `drift: PSI above ${d.threshold}`);
    if (d.psi > d.threshold / 2) return h("span", { class: "badge changed" }, "moderate shift");
    return h("span", { class: "badge active" }, "stable");
  }

  function showDrift(r, section) {
    const entries = Object.entries(r.drift);
    const drifted = entries.filter(([, d]) => d.drifted).map(([name]) => FEATURES[name] || name);
    const threshold = entries.length ? entries[0][1].threshold : 0.2;
    section.append(
      h(
        "p",
        { class: `notice ${drifted.length ? "warning" : "success"}`, role: "status", dataset: { drifted: r.drifted } },
        drifted.length
          ? `Drift against the baseline: ${drifted.join(", ")} (PSI above ${threshold}).`
          : `No significant drift against the baseline (every PSI at or below ${threshold}).`,
      ),
      h(
        "table",
        { class: "data drift", "aria-labelledby": "drift-title" },
        tableHead(["Feature", "PSI", "Baseline requests", "Window requests", "Reading"]),
        h(
          "tbody",
          null,
          entries.map(([name, d]) =>
            h(
              "tr",
              { dataset: { feature: name, drifted: d.drifted }, class: d.drifted ? "drifted" : null },
              h("th", { scope: "row" }, FEATURES[name] || name),
              h(
                "td",
                { class: "num", dataset: { value: JSON.stringify(d.psi) } },
                d.psi === null ? "–" : d.psi.toFixed(3),
              ),
              h("td", { class: "num" }, formatInt(d.baseline_count)),
              h("td", { class: "num" }, formatInt(d.current_count)),
              h("td", null, flag(d)),
            ),
          ),
        ),
      ),
      h(
        "p",
        { class: "hint" },
        "PSI (population stability index) compares the successful requests' distributions: below 0.1 stable, 0.1 to 0.2 a moderate shift, above 0.2 a significant one.",
      ),
    );
    const figures = h("div", { class: "charts" });
    section.append(figures);
    for (const [name, d] of entries) {
      if (!d.bins.length) continue;
      const [el, fig] = figure(`${FEATURES[name] || name}: share per bin, baseline and window`, `Drift of ${name}`);
      figures.append(fig);
      charts.push(
        categoryBars(
          el,
          d.bins.map((b) => b.bin),
          [
            { label: "baseline", color: COLORS.baseline, values: d.bins.map((b) => b.baseline) },
            { label: "window", color: COLORS.current, values: d.bins.map((b) => b.current) },
          ],
          { format: (t) => `${Math.round(t * 100)}%`, legendLabel: "bin" },
        ),
      );
    }
  }

  let models = [];
  try {
    models = (await admin.get("admin/models")).data.map((m) => m.id);
  } catch (err) {
    ctx.notices.error(err, "models"); // the report lives in the store: the address's model still shows
  }
  const wanted = q.get("model") || models[0] || "";
  if (wanted && !models.includes(wanted)) models.push(wanted);
  modelSelect.replaceChildren(...models.map((m) => h("option", { value: m, selected: m === wanted }, m)));
  if (!models.length) {
    report.append(h("p", { class: "empty" }, "No model to report on (see the message above, if any)."));
    return;
  }
  try {
    await load();
  } catch (err) {
    ctx.notices.error(err, "report");
  }
}
