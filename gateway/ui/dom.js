// DOM helpers shared by the pages: an element builder that only ever sets text (never HTML, so
// data from the API cannot inject markup), notices, a confirmation dialog, number formatting.

/** h("button", {class: "x", onclick: f}, "Text", child, [more]) -> HTMLElement */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "value" || name === "checked" || name === "disabled" || name === "selected") {
      el[name] = value; // properties, not attributes: they must reflect later changes
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

let nextId = 0;
/** A unique id for label/for and aria-describedby pairs. */
export function uid(prefix) {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

/** A labelled form field: <div class="field"><label for=id>label</label><input id=id ...></div>. */
export function field(label, input, hint) {
  const id = input.id || uid("f");
  input.id = id;
  const parts = [h("label", { for: id }, label), input];
  if (hint) {
    const hintId = `${id}-hint`;
    input.setAttribute("aria-describedby", hintId);
    parts.push(h("small", { id: hintId, class: "hint" }, hint));
  }
  return h("div", { class: "field" }, parts);
}

/** The text of an error for people: "503 · Quota store unavailable, retry shortly. (quota_unavailable)". */
export function describeError(err) {
  if (err && err.name === "ApiError") {
    const status = err.status ? `${err.status} · ` : "";
    const code = err.code ? ` (${err.code})` : "";
    return `${status}${err.message}${code}`;
  }
  if (err && err.name === "AbortError") return "Stopped.";
  return `Unexpected error: ${err && err.message ? err.message : String(err)}`;
}

/** Notices in one live region; a keyed notice replaces the previous one with that key. */
export class Notices {
  constructor(region) {
    this.region = region;
  }

  show(kind, text, key) {
    if (key) this.clear(key);
    const close = h("button", { type: "button", class: "quiet close", "aria-label": "Dismiss" }, "×");
    const notice = h(
      "div",
      { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status", dataset: key ? { key } : {} },
      h("span", null, text),
      close,
    );
    close.addEventListener("click", () => notice.remove());
    this.region.append(notice);
    return notice;
  }

  error(err, key) {
    if (!err || (err.name !== "ApiError" && err.name !== "AbortError")) {
      console.error("console: unexpected error:", err); // a bug, not a refusal: the browser tests fail on it
    }
    return this.show("error", describeError(err), key);
  }

  success(text, key) {
    return this.show("success", text, key);
  }

  clear(key) {
    for (const el of [...this.region.children]) {
      if (key === undefined || el.dataset.key === key) el.remove();
    }
  }
}

/** Asks in a modal <dialog> (focus moves into it, Escape cancels). Resolves true on confirm;
 * `keep` names the safe choice. */
export function confirmDialog({ title, text, confirm, danger = false, keep = "Cancel" }) {
  return new Promise((resolve) => {
    const ok = h("button", { type: "button", class: danger ? "danger" : "primary" }, confirm);
    const cancel = h("button", { type: "button" }, keep);
    const titleId = uid("dlg");
    const dialog = h(
      "dialog",
      { "aria-labelledby": titleId },
      h("h2", { id: titleId }, title),
      h("p", null, text),
      h("div", { class: "actions" }, cancel, ok),
    );
    const finish = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    ok.addEventListener("click", () => finish(true));
    cancel.addEventListener("click", () => finish(false));
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finish(false);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus(); // the safe choice has focus
  });
}

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
export const formatInt = (n) => (n === null || n === undefined ? "–" : integer.format(n));
export const formatPercent = (x) => `${Math.round((x || 0) * 100)}%`;

/** ISO timestamps from the API, shown in UTC like the quotas count them. */
export function formatTime(iso) {
  return iso ? iso.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, " UTC") : "never";
}

/** Unix seconds (batch and file objects), shown like formatTime. */
export function formatUnix(seconds) {
  return seconds === null || seconds === undefined ? "–" : formatTime(new Date(seconds * 1000).toISOString());
}

/** A duration in seconds for people: "84.2 ms", "1.25 s", "–" when there is none. */
export function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

/** A number with at most `digits` decimals ("12.5", "1,024"), "–" when there is none. */
export function formatNumber(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  return new Intl.NumberFormat("en-US", { maximumFractionDigits: digits }).format(x);
}

/**
 * Hands `blob` to the browser as a download named `filename`: a link to a blob: URL of this page,
 * clicked by script (the data is fetched with the admin key first, which a plain link could not
 * send). The URL is revoked once the browser has had time to start saving it.
 */
export function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** <thead> with one row of column headers. */
export function tableHead(columns) {
  return h(
    "thead",
    null,
    h(
      "tr",
      null,
      columns.map((c) => h("th", { scope: "col" }, c)),
    ),
  );
}

/** Empties an element (faster and clearer than innerHTML = ""). */
export function clear(el) {
  el.replaceChildren();
  return el;
}
