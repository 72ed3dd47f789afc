// Batches: every owner's batches (GET /admin/batches, newest first, a page at a time) with their
// progress, status and times; cancel one (after a confirmation); download its output and error
// files. The page refreshes itself every 2 s while a batch it shows is still running.

import { admin, queryString } from "../api.js";
import { confirmDialog, formatInt, formatUnix, h, saveBlob, tableHead } from "../dom.js";

const LIVE_MS = 2000;
const PAGE_SIZE = 20;
const RUNNING = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const CANCELLABLE = new Set(["validating", "in_progress"]); // what POST .../cancel accepts
const BADGES = { completed: "active", failed: "revoked", expired: "expired", cancelled: "neutral" };
// When each status began: the batch object's *_at fields, in the order a batch goes through them.
const STEPS = [
  ["created", "created_at"],
  ["in progress", "in_progress_at"],
  ["cancelling", "cancelling_at"],
  ["finalizing", "finalizing_at"],
  ["completed", "completed_at"],
  ["failed", "failed_at"],
  ["expired", "expired_at"],
  ["cancelled", "cancelled_at"],
];
const COLUMNS = ["Batch", "Owner key", "Status", "Progress", "Times (UTC)", "Files", ""];
const SHOWN_ERRORS = 20;

export async function render(view, ctx) {
  const cursors = [null]; // the `after` of each page seen so far: back is one step up this stack
  let batches = [];
  let hasMore = false;

  const tableBody = h("tbody");
  const updated = h("p", { class: "hint", role: "status" });
  const refreshButton = h("button", { type: "button", onclick: () => refresh() }, "Refresh");
  const newer = h("button", { type: "button", disabled: true, onclick: () => turn(-1) }, "← Newer");
  const older = h("button", { type: "button", disabled: true, onclick: () => turn(1) }, "Older →");
  const pageInfo = h("span", { class: "hint" });

  view.append(
    h("div", { class: "page-head" }, h("h1", null, "Batches"), refreshButton),
    h(
      "p",
      { class: "hint" },
      "Every key's batches, newest first. Output and error files download with the admin key; a running batch can be cancelled: its lines in flight finish, the others fail with batch_cancelled.",
    ),
    updated,
    h("table", { class: "data batches", "aria-label": "Batches" }, tableHead(COLUMNS), tableBody),
    h("div", { class: "pager" }, newer, pageInfo, older),
  );

  async function load() {
    const after = cursors[cursors.length - 1];
    const page = await admin.get(`admin/batches${queryString({ limit: PAGE_SIZE, after })}`);
    batches = page.data;
    hasMore = page.has_more;
    show();
  }

  /** Where the reader is in the table (open details, the focused button), to keep across a refresh. */
  function placeOf(el) {
    const tr = el.closest("tr[data-batch-id]");
    const label = el.tagName === "DETAILS" ? el.querySelector("summary").textContent : el.textContent;
    return tr ? `${tr.dataset.batchId} ${el.tagName} ${el.className} ${label}` : null;
  }

  function show() {
    const open = new Set([...tableBody.querySelectorAll("details[open]")].map(placeOf));
    const focused = tableBody.contains(document.activeElement) ? placeOf(document.activeElement) : null;
    tableBody.replaceChildren(...batches.map(row));
    for (const el of tableBody.querySelectorAll("details, summary, button")) {
      const place = placeOf(el);
      if (el.tagName === "DETAILS" && open.has(place)) el.open = true;
      if (focused && place === focused) el.focus();
    }
    if (!batches.length)
      tableBody.append(
        h("tr", null, h("td", { colspan: COLUMNS.length, class: "empty" }, "No batches yet (POST /v1/batches).")),
      );
    newer.disabled = cursors.length === 1;
    older.disabled = !hasMore;
    pageInfo.textContent = `Page ${cursors.length}`;
    const clock = new Date().toISOString().slice(11, 19);
    updated.textContent = batches.some((b) => RUNNING.has(b.status))
      ? `Live: refreshed every ${LIVE_MS / 1000} s while a batch runs · updated ${clock} UTC`
      : `Every batch shown has finished · updated ${clock} UTC`;
  }

  function row(b) {
    const counts = b.request_counts;
    const done = counts.completed + counts.failed;
    const steps = STEPS.filter(([, field]) => b[field] !== null && b[field] !== undefined);
    const [lastStep, lastField] = steps[steps.length - 1] || STEPS[0];
    const lines = (b.errors && b.errors.data) || [];
    return h(
      "tr",
      { dataset: { batchId: b.id, status: b.status } },
      h(
        "td",
        null,
        h("code", null, b.id),
        h("div", { class: "hint" }, `${b.endpoint} · window ${b.completion_window}`),
      ),
      h(
        "td",
        null,
        b.owner
          ? h("a", { href: `#/keys/${encodeURIComponent(b.owner)}` }, h("code", null, b.owner))
          : "none (auth off)",
      ),
      h(
        "td",
        null,
        h("span", { class: `badge ${BADGES[b.status] || "changed"}` }, b.status.replace("_", " ")),
        lines.length
          ? h(
              "details",
              { class: "line-errors" },
              h("summary", null, `${lines.length} error${lines.length === 1 ? "" : "s"}`),
              h(
                "ul",
                null,
                lines
                  .slice(0, SHOWN_ERRORS)
                  .map((e) => h("li", null, e.line ? `line ${e.line}: ` : "", e.message, e.code ? ` (${e.code})` : "")),
              ),
            )
          : null,
      ),
      h(
        "td",
        { class: "progress" },
        h("meter", {
          min: 0,
          max: Math.max(1, counts.total),
          value: done,
          "aria-label": `Progress of ${b.id}: ${done} of ${counts.total} lines`,
        }),
        h(
          "div",
          { class: "counts" },
          `${formatInt(done)} of ${formatInt(counts.total)} done · ${formatInt(counts.completed)} completed · ${formatInt(counts.failed)} failed`,
        ),
      ),
      h(
        "td",
        { class: "times" },
        h(
          "div",
          null,
          `${lastStep} ${formatUnix(b[lastField])}`,
          " ",
          h(
            "details",
            null,
            h("summary", null, "all"),
            h(
              "dl",
              null,
              steps.map(([name, field]) => [h("dt", null, name), h("dd", null, formatUnix(b[field]))]),
              h("dt", null, "expires"),
              h("dd", null, formatUnix(b.expires_at)),
            ),
          ),
        ),
      ),
      h(
        "td",
        { class: "files" },
        download(b, b.output_file_id, "Output"),
        download(b, b.error_file_id, "Errors"),
        b.output_file_id || b.error_file_id
          ? null
          : h("span", { class: "hint" }, RUNNING.has(b.status) ? "when done" : "–"),
      ),
      h(
        "td",
        null,
        CANCELLABLE.has(b.status)
          ? h("button", { type: "button", class: "danger", onclick: () => cancel(b) }, "Cancel batch")
          : null,
      ),
    );
  }

  function download(batch, fileId, label) {
    if (!fileId) return null;
    const button = h("button", { type: "button", "aria-label": `${label} of ${batch.id}` }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const { blob, filename } = await admin.download(`admin/files/${encodeURIComponent(fileId)}/content`);
        const name = filename || `${fileId}.jsonl`;
        saveBlob(blob, name);
        ctx.notices.success(`Downloaded ${name} (${formatInt(blob.size)} bytes).`, "download");
      } catch (err) {
        if (!ctx.signal.aborted) ctx.notices.error(err, "download");
      } finally {
        button.disabled = false;
      }
    });
    return button;
  }

  async function cancel(batch) {
    const { total, completed, failed } = batch.request_counts;
    const sure = await confirmDialog({
      title: `Cancel ${batch.id}?`,
      text: `${formatInt(total - completed - failed)} of its ${formatInt(total)} lines have not finished. Lines in flight finish; the others fail with batch_cancelled. Its owner gets the output and error files of what ran. This cannot be undone.`,
      confirm: "Cancel the batch",
      keep: "Keep it running",
      danger: true,
    });
    if (!sure) return;
    try {
      const cancelled = await admin.post(`admin/batches/${encodeURIComponent(batch.id)}/cancel`);
      ctx.notices.success(`${batch.id} is ${cancelled.status.replace("_", " ")}.`, "cancel");
      batches = batches.map((b) => (b.id === cancelled.id ? cancelled : b));
      show();
    } catch (err) {
      ctx.notices.error(err, "cancel");
    }
    await refresh();
  }

  async function refresh() {
    try {
      await load();
      ctx.notices.clear("list");
    } catch (err) {
      if (ctx.signal.aborted) return;
      ctx.notices.error(err, "list");
      if (!batches.length) {
        const retry = h("button", { type: "button", onclick: () => refresh() }, "Retry");
        tableBody.replaceChildren(
          h(
            "tr",
            null,
            h(
              "td",
              { colspan: COLUMNS.length, class: "empty" },
              "The batches could not be loaded (see the message above). ",
              retry,
            ),
          ),
        );
      }
      updated.textContent = "Not updated: see the message above.";
    }
  }

  async function turn(step) {
    if (step > 0 && batches.length) cursors.push(batches[batches.length - 1].id);
    else if (step < 0 && cursors.length > 1) cursors.pop();
    await refresh();
  }

  await refresh();
  ctx.every(LIVE_MS, async () => {
    if (batches.some((b) => RUNNING.has(b.status))) await refresh();
  });
}
