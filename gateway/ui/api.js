// Talking to the gateway: the admin API (with the admin key, or a single sign-on session: its
// HttpOnly cookie goes by itself, and every change carries the session's CSRF token) and the
// OpenAI API (with a client key). Keys and the CSRF token live only in this tab's sessionStorage:
// gone when the tab closes or on sign-out.
// Every failure becomes an ApiError with the status, the gateway's error code and its message.

const ADMIN_KEY = "gw.console.adminKey";
const CLIENT_KEY = "gw.console.clientKey";
const MODEL = "gw.console.model";
const SSO = "gw.console.sso"; // JSON {subject, role, teams, csrf} of a signed-in person

export const session = {
  adminKey: () => sessionStorage.getItem(ADMIN_KEY),
  setAdminKey: (key) => sessionStorage.setItem(ADMIN_KEY, key),
  sso: () => JSON.parse(sessionStorage.getItem(SSO) || "null"),
  setSso: (who) => (who ? sessionStorage.setItem(SSO, JSON.stringify(who)) : sessionStorage.removeItem(SSO)),
  signedIn: () => Boolean(sessionStorage.getItem(ADMIN_KEY) || sessionStorage.getItem(SSO)),
  /** admin, team_admin or viewer (the admin key is an admin). */
  role: () => (sessionStorage.getItem(ADMIN_KEY) ? "admin" : (session.sso() || {}).role || null),
  clientKey: () => sessionStorage.getItem(CLIENT_KEY) || "",
  setClientKey: (key) => (key ? sessionStorage.setItem(CLIENT_KEY, key) : sessionStorage.removeItem(CLIENT_KEY)),
  model: () => sessionStorage.getItem(MODEL) || "",
  setModel: (name) => sessionStorage.setItem(MODEL, name),
  signOut: () => sessionStorage.clear(),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** The gateway's OpenAI-shaped error body as an ApiError (or a plain one for other bodies). */
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page, an empty body): fall back to the status text
  }
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error === "object") {
    return new ApiError(response.status, error.code || error.type || null, error.message || response.statusText);
  }
  return new ApiError(response.status, null, response.statusText || "Request failed.");
}

function networkError(err) {
  if (err && err.name === "AbortError") return err;
  return new ApiError(0, "network_error", "Cannot reach the gateway (network error). Is it running?");
}

// The gateway's root, one level above the console's /ui/ (so a proxy's path prefix is kept).
const ROOT = new URL("../", document.baseURI);

/** fetch() of a path under the gateway's root ("admin/keys"); a network failure becomes an
 * ApiError; the response is returned as is. */
export async function send(method, path, { key, body, signal, headers } = {}) {
  const init = { method, headers: { ...headers }, signal, cache: "no-store", credentials: "same-origin" };
  if (key) init.headers.authorization = `Bearer ${key}`;
  else if (method !== "GET" && session.sso()) init.headers["x-csrf-token"] = session.sso().csrf;
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    return await fetch(new URL(path, ROOT), init);
  } catch (err) {
    throw networkError(err);
  }
}

async function json(method, path, options) {
  const response = await send(method, path, options);
  if (!response.ok) throw await errorFrom(response);
  try {
    return await response.json();
  } catch {
    throw new ApiError(response.status, "bad_response", "The gateway sent a response that is not JSON.");
  }
}

/** Runs `call` for the admin API; a refused key signs out (the admin key was changed, or the
 * session ended). Without an admin key the call goes with the session cookie. */
async function asAdmin(call) {
  try {
    return await call(session.adminKey());
  } catch (err) {
    if (err.status === 401 || (err.status === 403 && (err.code === "not_admin" || err.code === "csrf_failed"))) {
      session.signOut();
      window.dispatchEvent(new CustomEvent("gw:signed-out", { detail: err }));
    }
    throw err;
  }
}

const adminCall = (method, path, body) => asAdmin((key) => json(method, path, { key, body }));

/** The file name a Content-Disposition header gives (RFC 6266's filename* first), or null. */
function dispositionName(header) {
  if (!header) return null;
  const extended = /filename\*=UTF-8''([^;]+)/i.exec(header);
  if (extended) {
    try {
      return decodeURIComponent(extended[1].trim());
    } catch {
      // a malformed escape: fall back to the plain name
    }
  }
  const plain = /filename="([^"]*)"/i.exec(header);
  return plain ? plain[1] : null;
}

/** GET of a file with the admin key: {blob, filename} (the name the gateway gives, or null). */
async function adminDownload(path) {
  return asAdmin(async (key) => {
    const response = await send("GET", path, { key });
    if (!response.ok) throw await errorFrom(response);
    const filename = dispositionName(response.headers.get("content-disposition"));
    try {
      return { blob: await response.blob(), filename };
    } catch (err) {
      throw networkError(err); // the connection broke while the body was read
    }
  });
}

export const admin = {
  get: (path) => adminCall("GET", path),
  post: (path, body) => adminCall("POST", path, body),
  patch: (path, body) => adminCall("PATCH", path, body),
  put: (path, body) => adminCall("PUT", path, body),
  delete: (path) => adminCall("DELETE", path),
  download: adminDownload,
};

/** A query string of the set values ({a: 1, b: null} -> "?a=1"), or "" when none is set. */
export function queryString(params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(name, String(value));
  }
  const text = query.toString();
  return text ? `?${text}` : "";
}

/**
 * Whether this gateway has its admin API on, asked without a key:
 * "enabled" (401: it wants a key), "disabled" (403 admin_disabled: no GATEWAY_ADMIN_KEY),
 * "absent" (404 admin_disabled: no Redis configured). Throws on other failures.
 */
export async function adminState() {
  const response = await send("GET", "admin/keys");
  if (response.status === 401 || response.ok) return "enabled";
  const err = await errorFrom(response);
  if (response.status === 404) return "absent"; // 404 admin_disabled too: no Redis configured
  if (err.code === "admin_disabled") return "disabled";
  throw err;
}

/** Checks a candidate admin key; resolves on success, throws the gateway's ApiError otherwise. */
export async function checkAdminKey(key) {
  await json("GET", "admin/keys", { key });
}

/** The models a client key may use (GET /v1/models), or all of them when auth is off. */
export async function clientModels(key) {
  const body = await json("GET", "v1/models", { key });
  return (body.data || []).map((m) => m.id);
}

/** Who is signed in through single sign-on: {signed_in, sso, subject, role, teams, csrf}, or
 * {sso: false} when this gateway has no sign-in configured. */
export async function ssoState() {
  const response = await send("GET", "ui/auth/me");
  if (response.status === 404) return { sso: false, signed_in: false };
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/** Ends the single sign-on session (the gateway forgets it and clears the cookie). */
export async function ssoSignOut() {
  const response = await send("POST", "ui/auth/logout");
  if (!response.ok && response.status !== 403) throw await errorFrom(response);
}
