// The console's shell: the page registry, hash routing, the navigation, sign-in gating, and the
// last line of defence that turns any uncaught error into a message on the page.

import { session, ssoSignOut, ssoState } from "./api.js";
import { Notices, describeError, h } from "./dom.js";

// Each page is one module in pages/ exporting render(view, ctx); see pages/README.md. Adding a
// page is one module plus one entry here.
const PAGES = [
  { route: "keys", title: "Keys", module: "./pages/keys.js", nav: true, admin: true },
  { route: "keys/:id", title: "Key", module: "./pages/key.js", admin: true },
  { route: "teams", title: "Teams", module: "./pages/teams.js", nav: true, admin: true },
  { route: "teams/:id", title: "Team", module: "./pages/team.js", admin: true },
  { route: "audit", title: "Audit log", module: "./pages/audit.js", nav: true, admin: true },
  { route: "models", title: "Models & engines", module: "./pages/models.js", nav: true, admin: true },
  { route: "batches", title: "Batches", module: "./pages/batches.js", nav: true, admin: true },
  { route: "experiments", title: "Experiments", module: "./pages/experiments.js", nav: true, admin: true },
  { route: "requests", title: "Requests", module: "./pages/requests.js", nav: true, admin: true },
  { route: "config", title: "Configuration", module: "./pages/config.js", nav: true, admin: true },
  { route: "playground", title: "Playground", module: "./pages/playground.js", nav: true, admin: false },
  { route: "signin", title: "Sign in", module: "./pages/signin.js", admin: false },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
const notices = new Notices(document.getElementById("notices"));
let current = null; // the shown page's context: left (timers stopped, requests aborted) on navigation
let generation = 0;
let flash = null; // a message to show on the next page (route changes clear the notices)

function match(hash) {
  const [path, search = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  for (const page of PAGES) {
    const pattern = page.route.split("/");
    if (pattern.length !== parts.length) continue;
    const params = {};
    const ok = pattern.every((segment, i) => {
      if (segment.startsWith(":")) {
        params[segment.slice(1)] = decodeURIComponent(parts[i]);
        return true;
      }
      return segment === parts[i];
    });
    if (ok) return { page, params, query: new URLSearchParams(search) };
  }
  return null;
}

export function navigate(route, message) {
  if (message) flash = message;
  const hash = `#/${route}`;
  if (location.hash === hash) show();
  else location.hash = hash;
}

function context(params, query) {
  const controller = new AbortController();
  const leaving = [];
  return {
    params,
    query,
    notices,
    navigate,
    signal: controller.signal,
    onLeave: (fn) => leaving.push(fn),
    /** Runs fn `ms` after the last run ended, again and again, until the page is left. */
    every(ms, fn) {
      if (controller.signal.aborted) return; // left while the page was still loading
      let timer = null;
      const tick = async () => {
        try {
          await fn();
        } catch (err) {
          if (!controller.signal.aborted) notices.error(err, "poll");
        }
        if (!controller.signal.aborted) timer = setTimeout(tick, ms);
      };
      leaving.push(() => clearTimeout(timer));
      timer = setTimeout(tick, ms);
    },
    leave() {
      controller.abort();
      for (const fn of leaving.splice(0)) {
        try {
          fn();
        } catch {
          // a page's cleanup failing must not stop the next page
        }
      }
    },
  };
}

function renderNav(active) {
  nav.replaceChildren(
    ...PAGES.filter((p) => p.nav).map((p) =>
      h(
        "li",
        null,
        h(
          "a",
          { href: `#/${p.route}`, "aria-current": active && active.route.split("/")[0] === p.route ? "page" : null },
          p.title,
        ),
      ),
    ),
  );
  signOutButton.hidden = !session.signedIn();
  const who = session.sso();
  signOutButton.textContent = who ? `Sign out (${who.subject}, ${who.role})` : "Sign out";
}

async function show() {
  const mine = ++generation;
  if (current) current.leave();
  current = null;
  notices.clear();
  if (flash) {
    notices.show(flash.kind || "success", flash.text);
    flash = null;
  }
  const found = match(location.hash);
  if (!found) {
    navigate(session.signedIn() ? "keys" : "signin");
    return;
  }
  const { page, params, query } = found;
  if (page.admin && !session.signedIn()) {
    navigate(`signin?next=${encodeURIComponent(location.hash.slice(2))}`);
    return;
  }
  renderNav(page);
  document.title = `${page.title} · LLM gateway console`;
  const view = h("div", { class: "page", dataset: { page: page.route } });
  main.replaceChildren(view);
  const ctx = context(params, query);
  current = ctx;
  try {
    const module = await import(page.module);
    if (mine !== generation) return;
    await module.render(view, ctx);
  } catch (err) {
    if (mine !== generation || ctx.signal.aborted) return;
    console.error("console: unexpected error:", err);
    view.append(
      h("p", { class: "notice error", role: "alert" }, `This page could not be shown: ${describeError(err)}`),
    );
  }
  if (mine === generation) {
    const heading = view.querySelector("h1");
    if (heading && !view.contains(document.activeElement)) {
      heading.tabIndex = -1;
      heading.focus({ preventScroll: true });
    }
  }
}

signOutButton.addEventListener("click", async () => {
  if (session.sso()) {
    try {
      await ssoSignOut();
    } catch (err) {
      notices.error(err, "sign-out");
    }
  }
  session.signOut();
  navigate("signin", { text: "Signed out." });
});

// The admin key stopped working (changed on the gateway): back to sign-in, saying why.
window.addEventListener("gw:signed-out", (event) => {
  navigate("signin", { kind: "error", text: `Signed out: ${describeError(event.detail)}` });
});

// Nothing may end as a blank page or a silent failure.
function uncaught(err) {
  notices.error(err, "uncaught"); // logs it too
}
window.addEventListener("error", (event) => uncaught(event.error || new Error(event.message)));
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason && event.reason.name === "AbortError") return; // a page left mid-request
  uncaught(event.reason);
});

document.querySelector(".skip")?.addEventListener("click", (event) => {
  event.preventDefault(); // the hash is the router's
  main.focus();
});

// A single sign-on session (its cookie is HttpOnly: only the gateway can say whether there is one).
async function start() {
  try {
    const state = await ssoState();
    if (state.signed_in) {
      session.setSso({ subject: state.subject, role: state.role, teams: state.teams, csrf: state.csrf });
    } else if (session.sso()) {
      session.setSso(null); // the session ended (expired, signed out elsewhere)
    }
  } catch (err) {
    notices.error(err, "sso");
  }
  window.addEventListener("hashchange", show);
  show();
}
start();
