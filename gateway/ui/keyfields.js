// The fields of an API key as a form, shared by the create form (pages/keys.js) and the edit form
// (pages/key.js): limits, allowed models, expiry, and the scheduling priority and weight.

import { field, formatInt, h, uid } from "./dom.js";

export const LIMITS = [
  { name: "rpm", label: "Requests per minute" },
  { name: "tpm", label: "Tokens per minute" },
  { name: "max_concurrent", label: "Concurrent requests" },
  { name: "daily_tokens", label: "Tokens per day (UTC)" },
  { name: "monthly_tokens", label: "Tokens per month (UTC)" },
];
const SHORT = { rpm: "rpm", tpm: "tpm", max_concurrent: "concurrent", daily_tokens: "day", monthly_tokens: "month" };
export const PRIORITIES = ["high", "normal", "low"];

/** "rpm 60 · tpm 20,000 · day 200,000", or "no limits". */
export function limitSummary(key) {
  const parts = LIMITS.filter((l) => key[l.name] !== null && key[l.name] !== undefined).map(
    (l) => `${SHORT[l.name]} ${formatInt(key[l.name])}`,
  );
  return parts.length ? parts.join(" · ") : "no limits";
}

export const isActive = (key) => !key.revoked && !(key.expires_at_unix && key.expires_at_unix * 1000 <= Date.now());
export const stateOf = (key) => (key.revoked ? "revoked" : isActive(key) ? "active" : "expired");

// <input type=datetime-local> holds "YYYY-MM-DDTHH:MM" with no zone; the form says it is UTC.
const toInput = (iso) => (iso ? iso.slice(0, 16) : "");
const fromInput = (value) => (value ? `${value}:00Z` : null);

/**
 * The form fields for `key` (a record from the admin API, or null for a new key), offering
 * `models` (names) as choices. Returns {element, values()}; values() gives every field in the
 * API's terms (null = no limit / all models / never expires).
 */
export function keyFields(key, models) {
  const limitInputs = LIMITS.map((l) => {
    const input = h("input", {
      type: "number",
      name: l.name,
      min: 1,
      step: 1,
      inputmode: "numeric",
      placeholder: "no limit",
    });
    input.value = key && key[l.name] !== null && key[l.name] !== undefined ? String(key[l.name]) : "";
    return { limit: l, input };
  });

  const allowed = new Set(key && key.models ? key.models : []);
  const choices = [...new Set([...models, ...allowed])].sort();
  const modelBoxes = choices.map((name) => ({
    name,
    box: h("input", { type: "checkbox", name: "models", value: name, checked: allowed.has(name), id: uid("model") }),
  }));
  const modelSet = h(
    "fieldset",
    { class: "models" },
    h("legend", null, "Models"),
    modelBoxes.length
      ? modelBoxes.map(({ name, box }) => h("label", { class: "check", for: box.id }, box, name))
      : h("p", { class: "hint" }, "No models are configured."),
    h("small", { class: "hint" }, "None checked: every model."),
  );

  const expires = h("input", { type: "datetime-local", name: "expires_at", step: 60 });
  expires.value = toInput(key ? key.expires_at : null);

  // The key's band and share when engines are full (fair-share scheduling); new keys: normal, 1.
  const priority = h(
    "select",
    { name: "priority" },
    PRIORITIES.map((p) => h("option", { value: p, selected: (key ? key.priority : "normal") === p }, p)),
  );
  const weight = h("input", {
    type: "number",
    name: "weight",
    min: 0.000001,
    max: 1000000,
    step: "any",
    inputmode: "decimal",
    required: true,
  });
  weight.value = key && key.weight !== null && key.weight !== undefined ? String(key.weight) : "1";
  const extra = [
    field("Priority", priority, "Its band when the engines are full: high goes first, low last."),
    field("Weight", weight, "Its share within the band, relative to the other keys'."),
  ];

  const element = h(
    "div",
    { class: "key-fields" },
    h(
      "div",
      { class: "grid" },
      limitInputs.map(({ limit, input }) => field(limit.label, input)),
    ),
    modelSet,
    h("div", { class: "grid" }, field("Expires at (UTC)", expires, "Empty: never."), extra),
  );

  function values() {
    const out = {};
    for (const { limit, input } of limitInputs) out[limit.name] = input.value === "" ? null : Number(input.value);
    const checked = modelBoxes.filter(({ box }) => box.checked).map(({ name }) => name);
    out.models = checked.length ? checked : null;
    out.expires_at = fromInput(expires.value);
    out.priority = priority.value;
    out.weight = Number(weight.value);
    return out;
  }

  return { element, values };
}

/** The fields of `values` that differ from the record `key` (what a PATCH should send). */
export function changedFields(key, values) {
  const changed = {};
  for (const [name, value] of Object.entries(values)) {
    let before = key[name] ?? null;
    let after = value;
    if (name === "models") {
      before = before ? [...before].sort().join(",") : null;
      after = after ? [...after].sort().join(",") : null;
    } else if (name === "expires_at") {
      before = toInput(before) || null;
      after = value ? value.slice(0, 16) : null;
    }
    if (before !== after) changed[name] = value;
  }
  return changed;
}
