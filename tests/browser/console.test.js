// The operator console in headless Chromium, against a real Synapse with the module and a
// real HAPI (tests/integration/test_operator_console.py builds the care network and runs
// this file with `node --test`, passing everything through the environment).
//
// What a server admin sees (health, the care network with its members and who is pending,
// the refusal, the dead letter and its retry), what anybody else gets (nothing), and what
// an attacker tries: no token, a token that ended, a page in a frame, a value that looks
// like HTML.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (the pytest driver sets it)`);
  return value;
};

const BASE = env("SFM_BASE_URL"); // http://127.0.0.1:<port>
const CONSOLE = `${BASE}/_synapse/client/fhir/admin/`;
const API = `${CONSOLE}api/`;
const ENDPOINTS = ["health", "networks", "denials", "dead-letters"];
const expected = JSON.parse(env("SFM_CONSOLE_EXPECTED"));
const WAIT = 30_000;

let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: env("SFM_CHROMIUM"),
    headless: true,
    args: ["--no-sandbox"],
  });
});

after(async () => {
  await browser?.close();
});

// A new browser context (its own sessionStorage), the console opened, the API answers seen
// (with `fakeClock`, the page's timers and Date run on Playwright's clock).
async function openConsole({ fakeClock = false } = {}) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  if (fakeClock) await context.clock.install();
  const page = await context.newPage();
  const apiAnswers = [];
  page.on("response", (response) => {
    if (response.url().startsWith(API)) apiAnswers.push([response.url(), response.status()]);
  });
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  const response = await page.goto(CONSOLE);
  return { context, page, response, apiAnswers, errors };
}

async function signIn(page, user, password) {
  await page.fill("#username", user);
  await page.fill("#password", password);
  await page.click("#password-form button[type=submit]");
}

const texts = (locator) => locator.allTextContents();

test("the page is served to anyone with headers that lock it down", async () => {
  const { context, response } = await openConsole();
  try {
    assert.equal(response.status(), 200);
    const headers = response.headers();
    const csp = headers["content-security-policy"];
    assert.match(csp, /default-src 'self'/);
    assert.match(csp, /frame-ancestors 'none'/);
    assert.match(csp, /script-src 'self'(;|$)/);
    assert.doesNotMatch(csp, /unsafe/);
    assert.equal(headers["x-content-type-options"], "nosniff");
    assert.equal(headers["referrer-policy"], "no-referrer");
    assert.equal(headers["cache-control"], "no-store");
    assert.equal(headers["x-frame-options"], "DENY");
  } finally {
    await context.close();
  }
});

test("without a token every endpoint answers 401 M_MISSING_TOKEN, and a retry too", async () => {
  for (const name of ENDPOINTS) {
    const answer = await fetch(`${API}${name}`);
    assert.equal(answer.status, 401, name);
    assert.equal((await answer.json()).errcode, "M_MISSING_TOKEN", name);
  }
  // A cross-site form or fetch carries no Authorization header (the API reads no cookie).
  for (const path of ["dead-letters/retry", "audit/retry-refused"]) {
    const retry = await fetch(`${API}${path}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    assert.equal(retry.status, 401, path);
  }
});

test("a server admin sees health, the network, the refusal and the dead letter, and retries it", async () => {
  const { context, page, apiAnswers, errors } = await openConsole();
  try {
    await signIn(page, expected.admin_localpart, expected.admin_password);
    await page.waitForSelector("[data-testid=health-status]", { timeout: WAIT });
    assert.equal(await page.textContent("#whoami"), expected.admin_id);
    assert.match(await page.textContent("[data-testid=health-figures]"), /FHIR reachable\s*yes/);

    // The token lives in this tab's sessionStorage only.
    const stored = await page.evaluate(() => ({
      session: Object.keys(sessionStorage),
      local: Object.keys(localStorage),
      cookies: document.cookie,
    }));
    assert.deepEqual(stored.session.sort(), ["sfm-console-own-session", "sfm-console-token"]);
    assert.deepEqual(stored.local, []);
    assert.equal(stored.cookies, "");

    // Care networks, every team page by page (the HAPI may hold other tests' teams too)...
    await page.waitForSelector("[data-testid=network]", { timeout: WAIT });
    // ...or the one asked for: the team, its space, the thread room, who is in, who is pending.
    await page.fill("#team", expected.team);
    await page.click("#team-form button[type=submit]");
    await page.waitForFunction(
      (team) => {
        const shown = [...document.querySelectorAll("[data-testid=care-team]")];
        return shown.length === 1 && shown[0].textContent === team;
      },
      expected.team,
      { timeout: WAIT },
    );
    const network = page.locator("[data-testid=network]", {
      has: page.locator("[data-testid=care-team]", { hasText: expected.team }),
    });
    await network.waitFor({ timeout: WAIT });
    assert.equal(await network.locator("[data-testid=team-status]").textContent(), "active");
    assert.equal(await network.locator("[data-testid=space-id]").textContent(), expected.space_id);
    const room = network.locator("[data-testid=room]", {
      has: page.locator("[data-testid=room-id]", { hasText: expected.room_id }),
    });
    await room.waitFor({ timeout: WAIT });
    const cells = await texts(room.locator("td"));
    assert.equal(cells[0], "thread", cells.join(" | "));
    assert.equal(cells[2], expected.thread, cells.join(" | "));
    assert.ok((await texts(room.locator("[data-testid=joined] li"))).includes(expected.anna_id));
    assert.ok((await texts(room.locator("[data-testid=invited] li"))).includes(expected.bram_id));
    const pending = await texts(room.locator("[data-testid=pending-invite] li"));
    assert.deepEqual(pending.sort(), [expected.carla_id, expected.odd_id].sort());
    // The id that looks like HTML is shown as text, never parsed: no element came of it.
    assert.equal(await page.locator("img").count(), 0);
    assert.equal(await page.evaluate(() => window.sfmInjected), undefined);

    // Recent refusals: the rule, the room, the user.
    const refusal = page.locator("[data-testid=denial]", {
      has: page.locator("[data-testid=denial-user]", { hasText: expected.mallory_id }),
    });
    await refusal.first().waitFor({ timeout: WAIT });
    assert.equal(await refusal.first().locator("[data-testid=denial-rule]").textContent(), "not_in_care_team");
    assert.equal(await refusal.first().locator("[data-testid=denial-room]").textContent(), expected.room_id);
    assert.match(await refusal.first().locator("[data-testid=denial-action]").textContent(), /^invite/);

    // Dead letters: the message FHIR could not take, with its reason.
    const letter = page.locator("[data-testid=dead-letter]", {
      has: page.locator("[data-testid=dead-letter-event]", { hasText: expected.dead_event_id }),
    });
    await letter.waitFor({ timeout: WAIT });
    assert.match(await letter.locator("[data-testid=dead-letter-reason]").textContent(), /FHIR person/);

    const screenshot = process.env.SFM_CONSOLE_SCREENSHOT;
    if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

    // Retry: the letter leaves the list (it waits for FHIR again).
    await letter.locator("[data-testid=retry]").click();
    await page.waitForSelector("[data-testid=retried]", { timeout: WAIT });
    assert.match(await page.textContent("[data-testid=retried]"), /: 1$/);
    await letter.waitFor({ state: "detached", timeout: WAIT });

    // Every API call was answered, with the token, nothing refused.
    assert.ok(apiAnswers.length >= 5, JSON.stringify(apiAnswers));
    assert.deepEqual(apiAnswers.filter(([, status]) => status !== 200), []);
    assert.deepEqual(errors, []);

    // Logging out ends the session: its token no longer opens the API.
    const token = await page.evaluate(() => sessionStorage.getItem("sfm-console-token"));
    await page.click("#logout");
    await page.waitForSelector("#login:not([hidden])", { timeout: WAIT });
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    assert.equal(await page.locator("[data-testid=network]").count(), 0);
    const stale = await fetch(`${API}health`, { headers: { Authorization: `Bearer ${token}` } });
    assert.equal(stale.status, 401);
    assert.equal((await stale.json()).errcode, "M_UNKNOWN_TOKEN");
  } finally {
    await context.close();
  }
});

test("a console left alone for 15 minutes logs itself out and ends its session", async () => {
  const { context, page, errors } = await openConsole({ fakeClock: true });
  try {
    await signIn(page, expected.admin_localpart, expected.admin_password);
    await page.waitForSelector("[data-testid=health-status]", { timeout: WAIT });
    const token = await page.evaluate(() => sessionStorage.getItem("sfm-console-token"));
    assert.ok(token);
    // Ten quiet minutes, a key pressed, ten more: still signed in (idle is since the last
    // interaction, not since signing in).
    await page.clock.fastForward("10:00");
    await page.keyboard.press("Shift");
    await page.clock.fastForward("10:00");
    assert.equal(await page.isVisible("#session"), true);
    assert.equal(await page.evaluate(() => sessionStorage.getItem("sfm-console-token")), token);
    // Five more without a touch: fifteen since the key. The page logs out and says why.
    await page.clock.fastForward("05:10");
    await page.waitForSelector("#login:not([hidden])", { timeout: WAIT });
    assert.match(await page.textContent("#notice"), /Logged out after 15 minutes without activity/);
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    assert.equal(await page.locator("[data-testid=network]").count(), 0);
    // The session the console made is over on the homeserver too.
    const stale = await fetch(`${API}health`, { headers: { Authorization: `Bearer ${token}` } });
    assert.equal(stale.status, 401);
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test("a member who is not a server admin is told so and sees no data", async () => {
  const { context, page, apiAnswers } = await openConsole();
  try {
    await signIn(page, expected.member_localpart, expected.member_password);
    await page.waitForSelector("#notice:not([hidden])", { timeout: WAIT });
    await page.waitForFunction(() => /server admins only/.test(document.body.textContent), null, {
      timeout: WAIT,
    });
    assert.match(await page.textContent("#notice"), /server admins only/);
    assert.equal(await page.isHidden("#console"), true);
    const shown = await page.evaluate(() => document.documentElement.outerHTML);
    for (const value of [
      expected.space_id,
      expected.room_id,
      expected.team,
      expected.thread,
      expected.bram_id,
      expected.carla_id,
      expected.mallory_id,
      expected.dead_event_id,
    ]) {
      assert.ok(!shown.includes(value), `the page shows ${value}`);
    }
    // The API said no, and said nothing else.
    assert.ok(apiAnswers.length >= 1);
    assert.deepEqual(apiAnswers.filter(([, status]) => status !== 403), []);
    const token = await page.evaluate(() => sessionStorage.getItem("sfm-console-token"));
    for (const name of ENDPOINTS) {
      const answer = await fetch(`${API}${name}`, { headers: { Authorization: `Bearer ${token}` } });
      assert.equal(answer.status, 403, name);
      const body = await answer.json();
      assert.deepEqual(Object.keys(body).sort(), ["errcode", "error"]);
      assert.equal(body.errcode, "M_FORBIDDEN");
    }
    for (const path of ["dead-letters/retry", "audit/retry-refused"]) {
      const retry = await fetch(`${API}${path}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: "{}",
      });
      assert.equal(retry.status, 403, path);
    }
  } finally {
    await context.close();
  }
});

test("another site cannot show the console in a frame", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    // (setContent returns once the page and its frame have loaded, or failed to.)
    await page.setContent(`<iframe id="f" src="${CONSOLE}" width="800" height="600"></iframe>`);
    const frame = await (await page.$("#f")).contentFrame();
    const hasForm = await frame.$("#password-form").then((e) => e !== null).catch(() => false);
    assert.equal(hasForm, false, "the console rendered inside another page's frame");
  } finally {
    await context.close();
  }
});
