// The console's page logic: plain JavaScript, one module, no build step, nothing from another host.
// Every string from the server is put in the page as text (textContent, DOM nodes), never as HTML.
// The session is an HttpOnly cookie the page cannot read; the CSRF token lives only in this module.

const API = "/console/api";
const INDICATORS = { configured: "🟢", missing: "🟡", invalid: "🔴", expired: "⏰" };
let csrfToken = "";
// The key made or regenerated last in "My keys", for "Connect a client": only in this module's memory,
// never in storage or a cookie; forgotten on sign-out and when the page is left.
let freshKey = "";
const KEY_SHAPE = /^mgw_[A-Za-z0-9]{32}$/;
const SECTIONS = ["servers", "keys", "connect", "overrides"];

const $ = (id) => document.getElementById(id);

/** An element with attributes and children; strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

class ApiError extends Error {
  constructor(status, reason, message) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrfToken;
  const reply = await fetch(API + path, {
    method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try {
    data = await reply.json();
  } catch {
    data = {};
  }
  if (!reply.ok) {
    const error = data.error || {};
    if (reply.status === 401 && path !== "/session") showSignIn("Your session ended. Sign in again.");
    throw new ApiError(reply.status, error.reason || "http", error.message || `The console answered ${reply.status}.`);
  }
  return data;
}

function notice(text) {
  $("notice").textContent = text;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

// --- sign-in and navigation ---------------------------------------------------------------------

function showSignIn(message = "") {
  csrfToken = "";
  freshKey = "";
  ovServer = null;
  for (const id of ["nav", ...SECTIONS]) $(id).hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("key").focus();
}

function signedIn(me) {
  csrfToken = me.csrf_token;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("who").textContent = `${me.name} (${me.roles.join(", ")}, team ${me.team})`;
  // Only a page a role cannot use is hidden: the API's own role checks decide what each call may do.
  document.querySelector('#nav [data-section="overrides"]').hidden =
    !me.roles.some((role) => role === "manager" || role === "admin");
  show("servers");
}

function show(section) {
  for (const button of document.querySelectorAll("#nav [data-section]")) {
    if (button.dataset.section === section) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  $("new-key").hidden = true;
  $("new-key-value").textContent = "";
  for (const id of SECTIONS) $(id).hidden = section !== id;
  notice("");
  if (section === "servers") loadServers().catch(report($("notice")));
  else if (section === "connect") loadConnect().catch(report($("connect-error")));
  else if (section === "overrides") loadOverrideServers().catch(report($("ov-error")));
  else loadKeys().catch(report($("keys-error")));
}

function report(target) {
  return (error) => {
    if (error instanceof ApiError && error.status === 401) return;
    target.textContent = error.message;
  };
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("key");
  const key = input.value.trim();
  input.value = "";
  try {
    signedIn(await call("POST", "/session", { key }));
  } catch (error) {
    $("sign-in-error").textContent = error.message;
  }
});

$("sign-out").addEventListener("click", async () => {
  try {
    await call("DELETE", "/session");
  } finally {
    showSignIn("Signed out.");
  }
});

for (const button of document.querySelectorAll("#nav [data-section]")) {
  button.addEventListener("click", () => show(button.dataset.section));
}

// --- my servers ---------------------------------------------------------------------------------

async function loadServers() {
  const { servers } = await call("GET", "/servers");
  const list = $("server-list");
  list.replaceChildren();
  if (servers.length === 0) list.append(el("p", {}, "No server asks you for a credential."));
  for (const server of servers) list.append(serverCard(server));
}

function serverCard(server) {
  const id = `server-${server.name}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const status = el("p", { class: "status", "data-status": server.status },
    `${INDICATORS[server.status] || "?"} ${server.status}`, server.reason ? ` — ${server.reason}` : "");
  const card = el("article", { class: "server", "aria-labelledby": `${id}-title`, "data-server": server.name },
    el("h3", { id: `${id}-title` }, server.name), status);
  const masks = Object.entries(server.values || {});
  if (masks.length) {
    card.append(el("p", { class: "masks" },
      `Saved (${server.source === "shared" ? "the server's shared value" : "yours"}): `,
      masks.map(([name, mask]) => `${name} ${mask}`).join(", ")));
  }
  const form = el("form", { "aria-label": `Credential for ${server.name}` });
  server.placeholders.forEach((placeholder, i) => {
    const inputId = `${id}-${i}`;
    form.append(
      el("label", { for: inputId }, placeholder.name, " ", el("span", {}, placeholder.required ? "(required)" : "(optional)")),
      el("input", { id: inputId, name: placeholder.name, type: "password", autocomplete: "off", spellcheck: "false",
                    required: placeholder.required && server.status !== "configured" }),
    );
  });
  const message = el("p", { role: "status", class: "message" });
  const save = el("button", { type: "submit" }, "Save");
  const remove = el("button", { type: "button", class: "danger" }, "Delete my credential");
  const test = el("button", { type: "button" }, "Test connection");
  form.append(el("div", { class: "actions" }, save, test, remove));
  test.addEventListener("click", async () => {
    message.textContent = "Testing…";
    try {
      const { result } = await call("POST", `/servers/${encodeURIComponent(server.name)}/credential/test`);
      await loadServers();
      const outcome = { ok: "✅ the upstream accepted your credential",
                        rejected: "❌ the upstream rejected your credential",
                        inconclusive: "❔ inconclusive" }[result.result] || result.result;
      notice(`Test connection to ${server.name}: ${outcome} (${result.detail}).`);
    } catch (error) {
      message.textContent = error.message;
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = {};
    for (const input of form.querySelectorAll("input")) if (input.value) values[input.name] = input.value;
    try {
      await call("PUT", `/servers/${encodeURIComponent(server.name)}/credential`, { values });
      await loadServers();
      notice(`Saved your credential for ${server.name}.`);
    } catch (error) {
      message.textContent = error.message;
    }
  });
  remove.addEventListener("click", async () => {
    try {
      await call("DELETE", `/servers/${encodeURIComponent(server.name)}/credential`);
      await loadServers();
      notice(`Deleted your credential for ${server.name}; the server's shared value applies, if it has one.`);
    } catch (error) {
      message.textContent = error.message;
    }
  });
  card.append(form, message);
  return card;
}

// --- my keys ------------------------------------------------------------------------------------

async function loadKeys() {
  const { keys } = await call("GET", "/keys");
  const body = $("key-table").tBodies[0];
  body.replaceChildren();
  for (const key of keys) {
    const actions = el("td");
    if (key.status === "active") {
      const revoke = el("button", { type: "button", class: "danger", "aria-label": `Revoke key ${key.label || key.key_id}` },
        "Revoke");
      revoke.addEventListener("click", async () => {
        try {
          await call("POST", `/keys/${encodeURIComponent(key.key_id)}/revoke`);
          await loadKeys();
          notice(`Revoked key ${key.label || key.key_id}.`);
        } catch (error) {
          $("keys-error").textContent = error.message;
        }
      });
      const regenerate = el("button", { type: "button", "aria-label": `Regenerate key ${key.label || key.key_id}` },
        "Regenerate");
      regenerate.addEventListener("click", () => confirmRegenerate(key, regenerate));
      actions.append(el("div", { class: "actions" }, regenerate, revoke));
    }
    body.append(el("tr", { "data-key-id": key.key_id },
      el("td", {}, key.label || "—"), el("td", {}, when(key.created_at)), el("td", {}, when(key.last_used_at)),
      el("td", {}, when(key.expires_at)), el("td", {}, key.scope.length ? key.scope.join(", ") : "all servers"),
      el("td", {}, key.status), actions));
  }
}

function showNewKey(secret) {
  freshKey = KEY_SHAPE.test(secret) ? secret : "";
  $("new-key-value").textContent = secret;
  $("new-key").hidden = false;
}

/** Regenerating replaces a key: say so, offer a grace period, and only then do it. */
function confirmRegenerate(key, button) {
  const row = button.closest("tr");
  if (row.nextElementSibling && row.nextElementSibling.classList.contains("confirm")) return;
  const selectId = `grace-${key.key_id}`;
  const grace = el("select", { id: selectId },
    el("option", { value: "0" }, "none: the old key stops now"), el("option", { value: "3600" }, "1 hour"),
    el("option", { value: "86400" }, "1 day"), el("option", { value: "604800" }, "7 days"));
  const go = el("button", { type: "button", class: "danger" }, "Regenerate now");
  const cancel = el("button", { type: "button" }, "Cancel");
  const panel = el("tr", { class: "confirm" }, el("td", { colspan: 7 },
    el("p", { role: "alert" }, `Warning: regenerating "${key.label || key.key_id}" issues a new key and revokes this one. `,
      "Every client using it must be switched to the new key."),
    el("label", { for: selectId }, "Grace period for the old key "), grace, " ", el("span", { class: "actions" }, go, cancel)));
  row.after(panel);
  grace.focus();
  cancel.addEventListener("click", () => { panel.remove(); button.focus(); });
  go.addEventListener("click", async () => {
    try {
      const made = await call("POST", `/keys/${encodeURIComponent(key.key_id)}/regenerate`,
                              { grace_seconds: Number(grace.value) });
      await loadKeys();
      showNewKey(made.secret);
      notice(`Regenerated key ${key.label || key.key_id}.`);
    } catch (error) {
      $("keys-error").textContent = error.message;
    }
  });
}

$("create-key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const expires = $("new-expires").value;
  const scope = $("new-scope").value.split(",").map((s) => s.trim()).filter(Boolean);
  $("keys-error").textContent = "";
  try {
    const made = await call("POST", "/keys", {
      label: $("new-label").value, scope, expires_at: expires ? `${expires}T23:59:59Z` : "",
    });
    showNewKey(made.secret);
    event.target.reset();
    await loadKeys();
  } catch (error) {
    $("keys-error").textContent = error.message;
  }
});

/** Copy a node's text; where the browser refuses the clipboard, select it for a copy by hand. */
async function copyText(node, what) {
  try {
    await navigator.clipboard.writeText(node.textContent);
    notice(`Copied the ${what}.`);
  } catch {
    const range = document.createRange();
    range.selectNodeContents(node);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    notice(`Select and copy the ${what} by hand: the browser refused the clipboard.`);
  }
}

$("copy-key").addEventListener("click", () => copyText($("new-key-value"), "new key"));

// --- connect a client ---------------------------------------------------------------------------

async function loadConnect() {
  const { clients, servers } = await call("GET", "/connect/choices");
  $("connect-origin").textContent = location.origin;
  $("connect-servers").replaceChildren(...servers.map((name) => el("option", { value: name })));
  const chosen = $("connect-client").value;
  $("connect-client").replaceChildren(...clients.map((c) => el("option", { value: c.id }, c.title)));
  if (chosen) $("connect-client").value = chosen;
  $("connect-keyed").disabled = !freshKey;
  $("connect-keyed").checked = Boolean(freshKey);
  clearConnect();
}

function clearConnect() {
  $("connect-result").hidden = true;
  $("connect-text").textContent = "";
  $("connect-error").textContent = "";
}

$("connect-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearConnect();
  const keyed = $("connect-keyed").checked && KEY_SHAPE.test(freshKey);
  const query = new URLSearchParams({ server: $("connect-server").value.trim(), client: $("connect-client").value,
                                      gateway_url: location.origin, keyed: keyed ? "1" : "0" });
  try {
    const config = await call("GET", `/connect?${query}`);
    // The answer never holds the key: the page puts it where key_slot stands (a key is letters, digits and _ only).
    const text = keyed ? config.text.split(config.key_slot).join(freshKey) : config.text;
    $("connect-text").textContent = text;
    $("connect-instruction").textContent = config.instruction;
    $("connect-file").textContent = config.file ? `Where: ${config.file}` : "A command to run.";
    $("connect-result").hidden = false;
  } catch (error) {
    $("connect-error").textContent = error.message;
  }
});

$("copy-connect").addEventListener("click", () => copyText($("connect-text"), "configuration"));

// --- auth overrides (managers and admins) -------------------------------------------------------

const MANAGE = "/manage/servers";
let ovServer = null; // the chosen server: name, placeholders, description

async function loadOverrideServers() {
  const { servers } = await call("GET", MANAGE);
  const select = $("ov-server");
  const chosen = select.value;
  select.replaceChildren(...servers.map((s) => el("option", { value: s.name }, s.name)));
  if (servers.some((s) => s.name === chosen)) select.value = chosen;
  $("ov-error").textContent = "";
  if (servers.length === 0) {
    $("ov-description").textContent = "No server takes credentials.";
    return;
  }
  await loadOverrides();
}

$("ov-server").addEventListener("change", () => loadOverrides().catch(report($("ov-error"))));

async function loadOverrides() {
  const name = $("ov-server").value;
  const { server, overrides, status } = await call("GET", `${MANAGE}/${encodeURIComponent(name)}/overrides`);
  if (!ovServer || ovServer.name !== server.name) overrideFields(server);
  ovServer = server;
  $("ov-description").textContent = server.description;
  $("ov-table").caption.textContent = `Overrides on ${server.name}`;
  $("ov-status").caption.textContent = `Credential status on ${server.name}`;
  const body = $("ov-table").tBodies[0];
  body.replaceChildren();
  if (overrides.length === 0) body.append(el("tr", {}, el("td", { colspan: 8 }, "No overrides on this server.")));
  for (const o of overrides) {
    const edit = el("button", { type: "button", "aria-label": `Edit the override of ${o.principal}` }, "Edit");
    const remove = el("button", { type: "button", class: "danger", "aria-label": `Delete the override of ${o.principal}` },
      "Delete");
    edit.addEventListener("click", () => {
      $("ov-principal").value = o.principal;
      $("ov-expires").value = o.expires_at ? o.expires_at.slice(0, 10) : "";
      const first = $("ov-fields").querySelector("input");
      (first || $("ov-principal")).focus();
      notice(`Editing ${o.principal}'s override on ${server.name}: enter each value again.`);
    });
    remove.addEventListener("click", () => deleteOverride(server.name, o.principal));
    body.append(el("tr", { "data-principal": o.principal },
      el("td", {}, o.principal), el("td", {}, o.kind),
      el("td", {}, Object.entries(o.values).map(([k, mask]) => `${k} ${mask}`).join(", ")),
      el("td", {}, o.updated_by), el("td", {}, when(o.updated_at)),
      el("td", {}, `${INDICATORS[o.status] || "?"} ${o.status}`, o.status_reason ? ` — ${o.status_reason}` : ""),
      el("td", {}, when(o.expires_at)), el("td", {}, el("div", { class: "actions" }, edit, remove))));
  }
  $("ov-principals").replaceChildren(...status.map((s) => el("option", { value: s.principal })));
  const rows = $("ov-status").tBodies[0];
  rows.replaceChildren(...status.map((s) => el("tr", { "data-principal": s.principal, "data-status": s.status },
    el("td", {}, s.principal), el("td", {}, s.team), el("td", {}, `${s.indicator} ${s.status}`),
    el("td", {}, { override: "override", shared: "the server's shared value" }[s.source] || "none"),
    el("td", {}, s.reason || ""))));
  await loadSummary();
  return status;
}

const SUMMARIES = { all: "all configured", some: "some missing", none: "none configured", update: "need updating" };

async function loadSummary() {
  const { principals } = await call("GET", "/manage/summary");
  $("ov-summary").tBodies[0].replaceChildren(...principals.map((p) => el("tr", { "data-principal": p.principal,
      "data-summary": p.summary },
    el("td", {}, p.principal), el("td", {}, `${p.indicator} ${SUMMARIES[p.summary] || p.summary}`),
    el("td", {}, Object.entries(p.servers).map(([server, status]) => `${server} ${INDICATORS[status] || "?"}`).join(", ")))));
}

/** The form's value fields, from the server's placeholders (required and optional marked). */
function overrideFields(server) {
  $("ov-fields").replaceChildren(...server.placeholders.flatMap((p, i) => [
    el("label", { for: `ov-value-${i}` }, p.name, " ", el("span", {}, p.required ? "(required)" : "(optional)")),
    el("input", { id: `ov-value-${i}`, name: p.name, type: "password", autocomplete: "off", spellcheck: "false",
                  required: p.required }),
  ]));
}

async function deleteOverride(server, principal) {
  $("ov-error").textContent = "";
  try {
    await call("DELETE", `${MANAGE}/${encodeURIComponent(server)}/overrides/${encodeURIComponent(principal)}`);
    const status = await loadOverrides();
    const row = status.find((s) => s.principal === principal);
    const fallback = row && row.source === "shared" ? "its shared value"
      : `none, so ${principal}'s status is ${row ? row.status : "missing"}`;
    notice(`Deleted ${principal}'s override on ${server}: ${principal} falls back to the server's default (${fallback}).`);
  } catch (error) {
    $("ov-error").textContent = error.message;
  }
}

$("ov-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("ov-error").textContent = "";
  const server = $("ov-server").value;
  const principal = $("ov-principal").value.trim();
  const values = {};
  for (const input of $("ov-fields").querySelectorAll("input")) if (input.value) values[input.name] = input.value;
  const expires = $("ov-expires").value;
  try {
    await call("PUT", `${MANAGE}/${encodeURIComponent(server)}/overrides/${encodeURIComponent(principal)}`,
               { values, expires_at: expires ? `${expires}T23:59:59Z` : "" });
    event.target.reset();
    await loadOverrides();
    notice(`Saved ${principal}'s override on ${server}.`);
  } catch (error) {
    $("ov-error").textContent = error.message;
  }
});

// --- start: signed in already? ------------------------------------------------------------------

call("GET", "/me").then(signedIn, () => showSignIn());
