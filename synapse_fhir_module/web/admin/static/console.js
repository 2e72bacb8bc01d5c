// The FHIR module's operator console: reads the admin API with a server admin's Matrix
// access token (kept in this tab's sessionStorage only) and shows what it answers. After
// 15 minutes without interaction it logs out (a session it made) or forgets the token.
//
// Every value from the server is put in the page as text (textContent, text nodes):
// a room id, a user id or a reason is never parsed as HTML. The page's CSP forbids inline
// code and HTML made from strings (Trusted Types) on top of that.
"use strict";

(function () {
  const TOKEN_KEY = "sfm-console-token";
  // Set when the console's own password login made the session (logging out ends it);
  // a pasted token is only forgotten (its session belongs to another client).
  const OWN_SESSION_KEY = "sfm-console-own-session";
  const API = "api/";
  const LOGIN = "/_matrix/client/v3/login";
  const LOGOUT = "/_matrix/client/v3/logout";
  const WHOAMI = "/_matrix/client/v3/account/whoami";
  const NETWORKS_PAGE = 10;
  const DENIALS_SHOWN = 50;
  const DEAD_LETTERS_SHOWN = 100;
  // Signed in, the page ends the session after this long without anyone touching it (an
  // admin's token is not left open in an unattended browser); checked this often.
  const IDLE_MS = 15 * 60 * 1000;
  const IDLE_CHECK_MS = 10 * 1000;
  const ACTIVITY = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "scroll"];

  const $ = (id) => document.getElementById(id);

  // ---- building the page from data, as text only ----

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "testid") node.dataset.testid = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function id(value) {
    return value === null || value === undefined
      ? h("span", { class: "muted" }, "—")
      : h("code", { class: "id" }, value);
  }

  function ids(list, testid) {
    if (list === null || list === undefined) {
      return h("span", { class: "muted", testid }, "unknown (FHIR unavailable)");
    }
    if (list.length === 0) return h("span", { class: "muted", testid }, "none");
    return h("ul", { class: "ids", testid }, list.map((value) => h("li", {}, id(value))));
  }

  function when(ms) {
    if (typeof ms !== "number") return "—";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function seconds(ms) {
    if (typeof ms !== "number") return "—";
    return `${(ms / 1000).toFixed(1)} s`;
  }

  function table(headings, rows, testid) {
    return h(
      "table",
      { testid },
      h("thead", {}, h("tr", {}, headings.map((text) => h("th", {}, text)))),
      h("tbody", {}, rows),
    );
  }

  function fill(sectionId, ...content) {
    $(sectionId).querySelector(".body").replaceChildren(...content);
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  // ---- talking to the homeserver ----

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  class Refused extends Error {
    constructor(status, body) {
      super(`${status} ${body && body.errcode ? body.errcode : ""}`);
      this.status = status;
      this.body = body;
    }
  }

  async function call(path, { method = "GET", body, auth = true } = {}) {
    const headers = { Accept: "application/json" };
    if (auth) headers.Authorization = `Bearer ${token()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) throw new Refused(response.status, data);
    return data;
  }

  // ---- sessions ----

  // ---- ending an idle session ----

  let lastActive = Date.now();
  let idleTimer = null;

  function touched() {
    lastActive = Date.now();
  }

  function watchIdle() {
    touched();
    if (idleTimer === null) idleTimer = setInterval(checkIdle, IDLE_CHECK_MS);
  }

  function stopWatchingIdle() {
    if (idleTimer !== null) clearInterval(idleTimer);
    idleTimer = null;
  }

  async function checkIdle() {
    if (idleTimer === null || !token()) return;
    if (Date.now() - lastActive < IDLE_MS) return;
    stopWatchingIdle();
    const minutes = Math.round(IDLE_MS / 60000);
    await endSession(
      `Logged out after ${minutes} minutes without activity.`,
      `Token forgotten after ${minutes} minutes without activity (its session was not ended).`,
    );
  }

  function showLogin(message) {
    stopWatchingIdle();
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(OWN_SESSION_KEY);
    clearData();
    $("console").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    notice(message || "");
  }

  function clearData() {
    for (const section of ["health", "networks", "denials", "dead-letters"]) fill(section);
  }

  function forbidden() {
    // Nothing of what the API holds reached the page: say why, show nothing else.
    clearData();
    $("console").hidden = true;
    notice("This console is for server admins only. Your account is not a server admin.");
  }

  async function signIn(event) {
    event.preventDefault();
    const user = $("username").value.trim();
    const password = $("password").value;
    $("password").value = "";
    // (A localpart or a full Matrix ID: the homeserver takes either.)
    const identifier = { type: "m.id.user", user };
    try {
      const answer = await call(LOGIN, {
        method: "POST",
        auth: false,
        body: {
          type: "m.login.password",
          identifier,
          password,
          initial_device_display_name: "FHIR module operator console",
        },
      });
      sessionStorage.setItem(TOKEN_KEY, answer.access_token);
      sessionStorage.setItem(OWN_SESSION_KEY, "1");
      await enter();
    } catch (e) {
      showLogin(e instanceof Refused && e.status === 403
        ? "Wrong user name or password."
        : "Sign-in failed: the homeserver did not accept it.");
    }
  }

  async function useToken(event) {
    event.preventDefault();
    const pasted = $("token").value.trim();
    $("token").value = "";
    if (!pasted) return;
    sessionStorage.setItem(TOKEN_KEY, pasted);
    sessionStorage.removeItem(OWN_SESSION_KEY);
    await enter();
  }

  // Ends the session the console made (its token forgotten either way); says so.
  async function endSession(ownMessage, pastedMessage) {
    const own = sessionStorage.getItem(OWN_SESSION_KEY) === "1";
    if (own && token()) {
      try {
        await call(LOGOUT, { method: "POST", body: {} });
      } catch (e) {
        // (Expired already: nothing to end.)
      }
    }
    showLogin(own ? ownMessage : pastedMessage);
  }

  function logOut() {
    return endSession("Logged out.", "Token forgotten (its session was not ended).");
  }

  function expired() {
    showLogin("Your session has ended or the token is not valid. Sign in again.");
  }

  async function enter() {
    let me;
    try {
      me = await call(WHOAMI);
    } catch (e) {
      if (e instanceof Refused && e.status === 401) return expired();
      return showLogin("The homeserver could not be reached.");
    }
    $("login").hidden = true;
    $("session").hidden = false;
    $("whoami").textContent = me.user_id;
    $("logout").textContent =
      sessionStorage.getItem(OWN_SESSION_KEY) === "1" ? "Log out" : "Forget token";
    notice("");
    watchIdle();
    await refresh();
  }

  // ---- the four sections ----

  async function refresh() {
    let health;
    try {
      health = await call(`${API}health`);
    } catch (e) {
      return failed(e, "health");
    }
    $("console").hidden = false;
    showHealth(health);
    await Promise.all([loadNetworks(null), loadDenials(), loadDeadLetters()]);
  }

  function failed(e, section) {
    if (e instanceof Refused && e.status === 403) return forbidden();
    if (e instanceof Refused && e.status === 401) return expired();
    fill(section, h("p", { class: "status-bad" }, `Could not load: ${e.message}`));
    return undefined;
  }

  function showHealth({ health, lags }) {
    const status = health.status === "ok" ? "status-ok" : "status-degraded";
    const figures = [
      ["FHIR reachable", lags.fhir_reachable ? "yes" : "NO"],
      ["Messages not in FHIR yet", lags.recording.pending],
      ["Oldest of them has waited", seconds(lags.recording.behind_ms)],
      ["Dead letters", lags.recording.dead],
      ["Sync running here", lags.sync.running ? "yes" : "no"],
      ["FHIR changes queued", lags.sync.queued],
      ["Syncs waiting for a retry", lags.sync.retrying],
      [
        "Oldest change waiting since",
        lags.sync.oldest_waiting_ms === null ? "none waits" : when(lags.sync.oldest_waiting_ms),
      ],
      ["Period boundaries scheduled", health.sync.scheduled_boundaries],
      ["Binding incidents", health.sync.binding_incidents],
    ];
    if (health.identity) {
      figures.push(["Ambiguous e-mail addresses", health.identity.ambiguous_emails]);
    }
    const audit = health.audit && health.audit.enabled ? health.audit : null;
    if (audit) {
      figures.push(["AuditEvents not in FHIR yet", audit.pending]);
      figures.push([
        "Oldest of them has waited",
        audit.oldest_age_seconds === null ? "none waits" : `${audit.oldest_age_seconds.toFixed(1)} s`,
      ]);
      figures.push(["AuditEvents FHIR refused (set aside)", audit.refused, "audit-refused"]);
    }
    fill(
      "health",
      h("p", {}, "Status: ", h("span", { class: status, testid: "health-status" }, health.status)),
      h(
        "dl",
        { class: "figures", testid: "health-figures" },
        figures.map(([label, value, testid]) =>
          h("div", {}, h("dt", {}, label), h("dd", testid ? { testid } : {}, String(value)))),
      ),
      audit && audit.refused > 0
        ? h("p", {}, h("button", { type: "button", testid: "audit-retry", onclick: retryAudit },
          "Retry refused AuditEvents"))
        : null,
    );
  }

  async function retryAudit() {
    let answer;
    let health;
    try {
      answer = await call(`${API}audit/retry-refused`, { method: "POST", body: {} });
      health = await call(`${API}health`);
    } catch (e) {
      return failed(e, "health");
    }
    showHealth(health);
    $("health").querySelector(".body").prepend(
      h("p", { class: "status-ok", testid: "audit-retried" },
        `AuditEvents back in the queue: ${answer.requeued}`),
    );
    return undefined;
  }

  // The care team asked for (a reference), or null: every team, page by page.
  let teamShown = null;

  async function loadNetworks(from) {
    const query = new URLSearchParams({ limit: String(NETWORKS_PAGE) });
    if (from) query.set("from", from);
    if (teamShown) query.set("care_team", teamShown);
    let page;
    try {
      page = await call(`${API}networks?${query}`);
    } catch (e) {
      return failed(e, "networks");
    }
    const body = $("networks").querySelector(".body");
    if (!from) body.replaceChildren();
    body.querySelector("[data-testid=networks-more]")?.remove();
    if (!from && page.networks.length === 0) {
      body.append(h("p", { class: "muted", testid: "networks-empty" },
        teamShown ? "The module has no space for this care team." : "No care team has a space yet."));
    }
    for (const network of page.networks) body.append(showNetwork(network));
    if (page.next) {
      body.append(h("button", { type: "button", testid: "networks-more",
        onclick: () => loadNetworks(page.next) }, "More care teams"));
    }
    return undefined;
  }

  function showNetwork(network) {
    const rows = network.rooms.map((room) =>
      h(
        "tr",
        { testid: "room" },
        h("td", {}, room.kind),
        h("td", { testid: "room-id" }, id(room.room_id)),
        h("td", {}, id(room.thread)),
        h("td", {}, ids(room.joined, "joined")),
        h("td", {}, ids(room.invited, "invited")),
        h("td", { class: "pending" }, ids(room.pending_invite, "pending-invite")),
        h("td", { class: "pending" }, ids(room.pending_removal, "pending-removal")),
      ),
    );
    return h(
      "div",
      { class: "network", testid: "network" },
      h(
        "h3",
        {},
        h("code", { class: "id", testid: "care-team" }, network.care_team),
        " — status ",
        h("span", { testid: "team-status" }, network.fhir_available ? network.status : "unknown (FHIR unavailable)"),
        " — space ",
        h("code", { class: "id", testid: "space-id" }, network.space_id),
      ),
      table(
        ["Kind", "Room", "Thread", "Joined", "Invited", "Pending invite", "Pending removal"],
        rows,
        "rooms",
      ),
      network.rooms_not_shown
        ? h("p", { class: "muted" }, `${network.rooms_not_shown} more rooms not shown`)
        : null,
    );
  }

  async function loadDenials() {
    let answer;
    try {
      answer = await call(`${API}denials?limit=${DENIALS_SHOWN}`);
    } catch (e) {
      return failed(e, "denials");
    }
    if (answer.denials.length === 0) {
      fill("denials", h("p", { class: "muted", testid: "denials-empty" }, "No refusals recorded."));
      return undefined;
    }
    fill(
      "denials",
      table(
        ["Time", "Rule", "What", "Room", "User", "By"],
        answer.denials.map((d) =>
          h(
            "tr",
            { testid: "denial" },
            h("td", {}, when(d.ts)),
            h("td", { testid: "denial-rule" }, id(d.rule)),
            h("td", { testid: "denial-action" }, d.action ? `${d.action} (${d.kind})` : d.kind),
            h("td", { testid: "denial-room" }, id(d.room_id)),
            h("td", { testid: "denial-user" }, id(d.user_id)),
            h("td", {}, id(d.actor_id)),
          ),
        ),
        "denials",
      ),
    );
    return undefined;
  }

  async function loadDeadLetters() {
    let answer;
    try {
      answer = await call(`${API}dead-letters?limit=${DEAD_LETTERS_SHOWN}`);
    } catch (e) {
      if (e instanceof Refused && e.status === 404) {
        fill("dead-letters", h("p", { class: "muted" }, "Recording is off: no dead letters."));
        return undefined;
      }
      return failed(e, "dead-letters");
    }
    if (answer.dead.length === 0) {
      fill("dead-letters", h("p", { class: "muted", testid: "dead-letters-empty" }, "No dead letters."));
      return undefined;
    }
    fill(
      "dead-letters",
      h("p", {}, h("button", { type: "button", testid: "retry-all", onclick: () => retry(null) },
        "Retry all")),
      table(
        ["Since", "Event", "Room", "Attempts", "Reason", ""],
        answer.dead.map((letter) =>
          h(
            "tr",
            { testid: "dead-letter" },
            h("td", {}, when(letter.enqueued_ts)),
            h("td", { testid: "dead-letter-event" }, id(letter.event_id)),
            h("td", {}, id(letter.room_id)),
            h("td", {}, String(letter.attempts)),
            h("td", { testid: "dead-letter-reason" }, letter.reason),
            h("td", {}, h("button", { type: "button", testid: "retry",
              onclick: () => retry([letter.event_id]) }, "Retry")),
          ),
        ),
        "dead-letters",
      ),
    );
    return undefined;
  }

  async function retry(eventIds) {
    let answer;
    try {
      answer = await call(`${API}dead-letters/retry`, {
        method: "POST",
        body: eventIds === null ? {} : { event_ids: eventIds },
      });
    } catch (e) {
      return failed(e, "dead-letters");
    }
    await loadDeadLetters();
    $("dead-letters").querySelector(".body").prepend(
      h("p", { class: "status-ok", testid: "retried" }, `Sent to FHIR again: ${answer.requeued}`),
    );
    return undefined;
  }

  // ---- start ----

  document.addEventListener("DOMContentLoaded", () => {
    for (const type of ACTIVITY) {
      document.addEventListener(type, touched, { capture: true, passive: true });
    }
    document.addEventListener("visibilitychange", checkIdle);
    $("password-form").addEventListener("submit", signIn);
    $("token-form").addEventListener("submit", useToken);
    $("logout").addEventListener("click", logOut);
    $("refresh").addEventListener("click", () => refresh());
    $("team-form").addEventListener("submit", (event) => {
      event.preventDefault();
      teamShown = $("team").value.trim() || null;
      loadNetworks(null);
    });
    $("all-teams").addEventListener("click", () => {
      teamShown = null;
      $("team").value = "";
      loadNetworks(null);
    });
    if (token()) enter();
    else showLogin("");
  });
})();
