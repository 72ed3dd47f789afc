// Sign-in with the admin key. Asks the gateway first whether its admin API is on at all, so an
// operator is told plainly when it is disabled instead of being refused key after key.

import { adminState, checkAdminKey, session, ssoState } from "../api.js";
import { describeError, field, h } from "../dom.js";

const DISABLED = {
  disabled:
    "The admin API is disabled on this gateway: start it with GATEWAY_ADMIN_KEY set to use the keys and models pages.",
  absent: "The admin API is disabled on this gateway: it needs Redis (redis.url in the config) and GATEWAY_ADMIN_KEY.",
};

export async function render(view, ctx) {
  const keyInput = h("input", {
    type: "password",
    name: "admin-key",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
  });
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const status = h("p", { class: "form-error", role: "alert", id: "signin-error" });
  keyInput.setAttribute("aria-describedby", "signin-error");
  const form = h(
    "form",
    { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h(
      "p",
      null,
      "Sign in with the gateway's admin key (GATEWAY_ADMIN_KEY). It stays in this tab only and is forgotten when you close it or sign out.",
    ),
    field("Admin key", keyInput),
    status,
    h("div", { class: "actions" }, submit),
  );
  const playgroundHint = h(
    "p",
    { class: "hint" },
    "The ",
    h("a", { href: "#/playground" }, "playground"),
    " needs only a client key.",
  );
  view.append(form, playgroundHint);
  try {
    const sso = await ssoState();
    if (sso.sso) {
      // A plain link: the sign-in is a full-page round trip through the provider.
      const link = h("a", { class: "button primary", href: "auth/login", id: "sso-sign-in" }, "Sign in with single sign-on");
      form.before(h("div", { class: "card narrow" }, h("p", null, "Sign in with your company account:"), link));
    }
  } catch (err) {
    ctx.notices.error(err, "sso");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    status.textContent = "";
    if (!key) {
      status.textContent = "Enter the admin key.";
      keyInput.focus();
      return;
    }
    submit.disabled = true;
    try {
      await checkAdminKey(key);
      session.setAdminKey(key);
      ctx.navigate(ctx.query.get("next") || "keys", { text: "Signed in." });
    } catch (err) {
      if (err.status === 403 && err.code === "not_admin") {
        status.textContent = "Wrong key: that is not this gateway's admin key.";
      } else if (err.status === 401) {
        status.textContent = `Wrong key: ${err.message}`;
      } else if (err.code === "admin_disabled") {
        status.textContent = DISABLED.disabled;
      } else {
        status.textContent = describeError(err);
      }
      keyInput.select();
      keyInput.focus();
    } finally {
      submit.disabled = false;
    }
  });

  try {
    const state = await adminState();
    if (state !== "enabled") {
      ctx.notices.show("error", DISABLED[state], "admin-state");
      keyInput.disabled = true;
      submit.disabled = true;
      form.classList.add("disabled");
    }
  } catch (err) {
    ctx.notices.error(err, "admin-state"); // e.g. Redis down: signing in may still fail, say why now
  }
  if (!keyInput.disabled) keyInput.focus();
}
