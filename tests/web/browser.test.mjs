// The web page in a real browser: Debian's headless Chromium, driven by playwright-core, against a
// real Conclave node with scripted worker agents. Run by `cargo test --test browser`
// (tests/browser.rs), which starts the node and the workers and sets:
//
//   CONCLAVE_URL          the node, e.g. http://127.0.0.1:41234
//   CONCLAVE_SCREENSHOTS  where the screenshots go (target/web-screenshots)
//   CHROMIUM              the browser (/usr/bin/chromium)
//   ADA_TOKEN             a token for user "Ada" (the node checks tokens and admits anonymous
//                         people too; Bob and Cy come without one)
//
// The workers it expects: one with capability `echo` that reports progress and answers
// {"echoed": input}, and three with `council` that propose "Paris", " paris " and "Lyon".
//
// The tests share one browser and one session and run in order: two people join, type, chat,
// reload, submit and cancel tasks, and open councils. Every wait is bounded.

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const BASE = process.env.CONCLAVE_URL;
const SHOTS = process.env.CONCLAVE_SCREENSHOTS || "../../target/web-screenshots";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ADA_TOKEN = process.env.ADA_TOKEN;
/** The longest any one thing on the page may take to show. */
const WAIT = 10_000;
const STEP = { timeout: 30_000 };

assert.ok(BASE, "CONCLAVE_URL must name the server under test (tests/browser.rs sets it)");
assert.ok(ADA_TOKEN, "ADA_TOKEN must hold a token for Ada (tests/browser.rs sets it)");

const session = `web-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
/** Uncaught errors and console errors, from every page, checked at the end. */
const problems = [];
let browser;
let ada;
let bob;

// ---- helpers ----------------------------------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `probe` until `ok(value)`, failing after `timeout` with the last value seen. */
async function until(what, probe, ok, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await probe();
    if (ok(last)) return last;
    if (Date.now() > deadline) assert.fail(`${what}: not within ${timeout} ms; last seen: ${JSON.stringify(last)}`);
    await sleep(50);
  }
}

function watch(page, who) {
  page.on("pageerror", (err) => problems.push(`${who}: uncaught ${err.stack || err.message}`));
  page.on("console", (msg) => {
    // Chromium logs every request refused while a test holds the page offline (the workers
    // panel polls); that is the test's doing, not the page's.
    if (msg.type() === "error" && !msg.text().includes("net::ERR_INTERNET_DISCONNECTED")) {
      problems.push(`${who}: console error: ${msg.text()}`);
    }
  });
}

/** A page in its own browser context (its own storage), watched for errors. */
async function newPage(who, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  watch(page, who);
  return page;
}

/** A person joined through the URL. */
async function person(name, options = {}) {
  const page = await newPage(name, options);
  await page.goto(`${BASE}/?session=${encodeURIComponent(session)}&name=${encodeURIComponent(name)}`);
  await live(page);
  return page;
}

async function live(page) {
  await page.locator('[data-testid="connection"][data-state="live"]').waitFor();
  await until("the editor is enabled", () => page.getByTestId("editor").isEnabled(), (on) => on);
}

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function serverDoc(doc = "main") {
  const response = await fetch(`${BASE}/v1/sessions/${encodeURIComponent(session)}/docs/${doc}`);
  assert.equal(response.status, 200, `GET the document: ${response.status}`);
  return (await response.json()).text;
}

const editorText = (page) => page.getByTestId("editor").inputValue();
const docState = (page) => page.getByTestId("doc-status").getAttribute("data-state");

/** The text of the task row whose kind is `kind`, and its state, newest first. */
async function tasks(page) {
  return page.getByTestId("task-item").evaluateAll((items) => items.map((li) => ({
    id: li.dataset.task,
    state: li.dataset.state,
    text: li.innerText,
  })));
}

async function councils(page) {
  return page.getByTestId("council-item").evaluateAll((items) => items.map((li) => ({
    id: li.dataset.council,
    state: li.dataset.state,
    phase: li.dataset.phase,
    text: li.innerText,
  })));
}

// ---- the browser ------------------------------------------------------------------------------

before(async () => {
  await mkdir(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    timeout: 20_000,
  });
});

after(async () => {
  await browser?.close();
});

// ---- the tests --------------------------------------------------------------------------------

test("Ada joins with the form and her token, which the page keeps", STEP, async () => {
  ada = await newPage("Ada");
  await ada.goto(`${BASE}/`);
  await ada.getByLabel("Session name").fill("no spaces allowed");
  await ada.getByLabel("Display name").fill("Ada");
  await ada.getByRole("button", { name: "Join", exact: true }).click();
  await until("the session name error", () => ada.locator("#session-error").innerText(), (t) => /Use only letters/.test(t));
  assert.equal(await ada.getByLabel("Session name").getAttribute("aria-invalid"), "true");
  await ada.getByText("Access token (optional)").click();
  await ada.getByLabel("Token", { exact: true }).fill(ADA_TOKEN);
  await shot(ada, "join-form");
  await ada.getByLabel("Session name").fill(session);
  await ada.getByRole("button", { name: "Join", exact: true }).click();
  await live(ada);
  assert.equal(await ada.evaluate(() => localStorage.getItem("conclave.token")), ADA_TOKEN);
  assert.match(ada.url(), new RegExp(`session=${session}`), "the address is the link to share");
});

test("two people join and see each other present", STEP, async () => {
  bob = await person("Bob", { viewport: { width: 900, height: 1000 } });
  for (const page of [ada, bob]) {
    await until("both people in the presence list", () => page.getByTestId("presence").innerText(),
      (t) => t.includes("Ada") && t.includes("Bob"));
  }
});

test("two people typing at once end with the same text, the server's", STEP, async () => {
  const adaEditor = ada.getByTestId("editor");
  const bobEditor = bob.getByTestId("editor");
  await adaEditor.click();
  await ada.keyboard.type("|");
  await until("Bob sees Ada's first keystroke", () => editorText(bob), (t) => t === "|");
  // Ada writes after the bar, Bob before it, both at once, keystroke by keystroke.
  await adaEditor.click();
  await ada.keyboard.press("Control+End");
  await bobEditor.click();
  await bob.keyboard.press("Control+Home");
  const adaWords = "ada writes here, after the bar.";
  const bobWords = "bob writes there, before it. ";
  await Promise.all([
    ada.keyboard.type(adaWords, { delay: 15 }),
    bob.keyboard.type(bobWords, { delay: 15 }),
  ]);
  const expected = `${bobWords}|${adaWords}`;
  const settled = async () => ({
    ada: await editorText(ada),
    bob: await editorText(bob),
    adaState: await docState(ada),
    bobState: await docState(bob),
    server: await serverDoc(),
  });
  const final = await until("both editors and the server agree", settled,
    (s) => s.adaState === "saved" && s.bobState === "saved" && s.ada === s.bob && s.bob === s.server && s.server === expected);
  assert.equal(final.server, expected);
  await shot(ada, "typed-ada");
});

test("chat sent in one page appears in the other", STEP, async () => {
  const input = bob.getByTestId("chat-input");
  await input.fill("Hello from Bob");
  await input.press("Enter");
  await until("Ada sees Bob's message", () => ada.getByTestId("chat-log").innerText(), (t) => t.includes("Hello from Bob"));
  await until("Bob's input is cleared", () => input.inputValue(), (v) => v === "");
  await ada.getByTestId("chat-input").fill("Hi Bob");
  await ada.getByTestId("chat-input").press("Enter");
  await until("Bob sees Ada's reply", () => bob.getByTestId("chat-log").innerText(), (t) => t.includes("Hi Bob"));
});

test("a page that drops off the network catches up when it is back", STEP, async () => {
  const state = () => ada.getByTestId("connection").getAttribute("data-state");
  await ada.context().setOffline(true);
  await until("Ada's page says it is offline", state, (s) => s === "offline");
  // Ada keeps typing while offline; Bob chats meanwhile.
  await ada.getByTestId("editor").click();
  await ada.keyboard.press("Control+End");
  await ada.keyboard.type(" Typed offline.");
  await until("the edit waits", () => docState(ada), (s) => s === "offline");
  await bob.getByTestId("chat-input").fill("While you were away");
  await bob.getByTestId("chat-input").press("Enter");
  await ada.context().setOffline(false);
  await until("Ada's page is live again", state, (s) => s === "live");
  await until("Ada gets the chat she missed", () => ada.getByTestId("chat-log").innerText(),
    (t) => t.includes("While you were away"));
  await until("the offline edit reaches the server and Bob",
    async () => ({ server: await serverDoc(), bob: await editorText(bob), ada: await editorText(ada), state: await docState(ada) }),
    (s) => s.server.endsWith(" Typed offline.") && s.bob === s.server && s.ada === s.server && s.state === "saved");
});

test("the workers panel lists the connected workers", STEP, async () => {
  const workers = ada.getByTestId("worker-item");
  const texts = await until("four workers listed", () => workers.allInnerTexts(), (t) => t.length >= 4);
  assert.ok(texts.some((t) => t.includes("echo")), `an echo worker: ${texts}`);
  assert.equal(texts.filter((t) => t.includes("council")).length, 3, `three council workers: ${texts}`);
});

test("the tasks panel submits a task that a worker completes, and shows its output", STEP, async () => {
  const panel = ada.getByTestId("tasks");
  await panel.getByLabel("Kind").fill("echo");
  await panel.getByLabel("Input").fill('{"text": "hello, worker"');
  await panel.getByTestId("task-submit").click();
  await until("a clear message for bad JSON", () => panel.getByTestId("task-error").innerText(),
    (t) => t.includes("not valid JSON"));
  assert.equal((await tasks(ada)).length, 0, "nothing was sent");

  await panel.getByLabel("Input").fill('{"text": "hello, worker"}');
  await panel.getByTestId("task-submit").click();
  const [done] = await until("the task completes", () => tasks(ada), (l) => l.length === 1 && l[0].state === "completed");
  assert.match(done.text, /echo/);
  assert.match(done.text, /"echoed"/);
  assert.match(done.text, /hello, worker/);
  assert.match(done.text, /attempt 1 of 3/);
  assert.ok(await panel.getByTestId("task-error").isHidden(), "the error went away");
  // Bob's list is live too.
  await until("Bob sees it completed", () => tasks(bob), (l) => l.some((t) => t.id === done.id && t.state === "completed"
    && t.text.includes("hello, worker")));

  // Nobody can do `nobody`: it waits in the queue until it is canceled.
  await panel.getByLabel("Kind").fill("nobody");
  await panel.getByLabel("Input").fill("[1, 2, 3]");
  await panel.getByTestId("task-submit").click();
  const queued = await until("the second task is queued", () => tasks(ada),
    (l) => l.length === 2 && l[0].state === "submitted");
  await ada.locator(`[data-task="${queued[0].id}"]`).getByRole("button", { name: /Cancel/ }).click();
  await until("it is canceled", () => tasks(ada), (l) => l.find((t) => t.id === queued[0].id)?.state === "canceled");
  await until("Bob sees it canceled", () => tasks(bob), (l) => l.find((t) => t.id === queued[0].id)?.state === "canceled");
  await shot(ada, "tasks-ada");
});

test("reloading the page keeps the document and rebuilds the tasks from the log", STEP, async () => {
  const before = await serverDoc();
  await bob.reload();
  await live(bob);
  await until("the document is back after a reload", () => editorText(bob), (t) => t === before);
  // Ada comes back through her link, with the token the page kept.
  await ada.reload();
  await live(ada);
  await until("Ada's document is back", () => editorText(ada), (t) => t === before);
  assert.equal(await ada.evaluate(() => localStorage.getItem("conclave.token")), ADA_TOKEN);
  const list = await until("both tasks are back", () => tasks(bob), (l) => l.length === 2);
  assert.deepEqual(list.map((t) => t.state), ["canceled", "completed"]);
  assert.match(list[1].text, /hello, worker/, "the output is rebuilt from task.completed");
  await until("the chat history is back", () => bob.getByTestId("chat-log").innerText(),
    (t) => t.includes("Hello from Bob") && t.includes("Hi Bob"));
  await until("presence still lists both", () => ada.getByTestId("presence").innerText(),
    (t) => t.includes("Ada") && t.includes("Bob"));
});

test("a reset shows its banner, and the page reloads its state and carries on", STEP, async () => {
  const text = await serverDoc();
  const response = await fetch(`${BASE}/v1/faults/sessions/${encodeURIComponent(session)}/panic`, { method: "POST" });
  assert.equal(response.status, 202, "the fault route (tests build with fault-injection)");
  await until("the reset banner shows", () => ada.getByTestId("reset-banner").isVisible(), (v) => v);
  await until("the tasks are rebuilt from the log", () => tasks(ada), (l) => l.length === 2
    && l[1].state === "completed" && l[1].text.includes("hello, worker"));
  await until("the chat is reloaded from the log", () => ada.getByTestId("chat-log").innerText(),
    (t) => t.includes("Hello from Bob") && t.includes("While you were away"));
  assert.equal(await editorText(ada), text);
  await ada.getByTestId("chat-input").fill("Still here after the reset");
  await ada.getByTestId("chat-input").press("Enter");
  await until("Bob sees it", () => bob.getByTestId("chat-log").innerText(), (t) => t.includes("Still here after the reset"));
  await ada.getByTestId("editor").click();
  await ada.keyboard.press("Control+End");
  await ada.keyboard.type("!");
  await until("edits still flow", async () => ({ server: await serverDoc(), bob: await editorText(bob) }),
    (s) => s.server === `${text}!` && s.bob === s.server);
  await shot(ada, "reset-ada");
});

/** Opens a council from Ada's panel. */
async function openCouncil(page, { question, agents, people = [], strategy = "majority", quorum }) {
  const panel = page.getByTestId("council");
  const details = panel.locator("#council-open");
  if (!(await details.evaluate((d) => d.open))) await panel.getByTestId("council-open").click();
  await panel.getByLabel("Question").fill(question);
  await panel.getByLabel("Agents").fill(String(agents));
  await panel.getByLabel("with capability").fill("council");
  for (const box of await panel.getByTestId("council-people").getByRole("checkbox").all()) await box.uncheck();
  for (const name of people) await panel.getByTestId("council-people").getByLabel(name).check();
  await panel.getByLabel("Strategy").selectOption(strategy);
  await panel.getByLabel("Phase timeout (s)").fill("20");
  await panel.getByLabel("Quorum").fill(String(quorum));
  const before = (await councils(page)).length;
  await panel.getByTestId("council-submit").click();
  await until("the council is acknowledged", () => panel.getByTestId("council-status").innerText(), (t) => t.startsWith("Council opened"));
  await until("the council is listed", () => councils(page), (l) => l.length === before + 1);
  assert.equal(await details.evaluate((d) => d.open), false, "the form makes way for the council");
}

test("the council panel shows a decision reached by scripted agents", STEP, async () => {
  const panel = ada.getByTestId("council");
  await panel.getByTestId("council-open").click();
  // Checked on the page, before anything is sent.
  await panel.getByLabel("Question").fill("Capital of France?");
  await panel.getByLabel("Agents").fill("2");
  await panel.getByLabel("Quorum").fill("3");
  await panel.getByTestId("council-submit").click();
  await until("a clear message for a quorum too high", () => panel.getByTestId("council-error").innerText(),
    (t) => t.includes("Quorum 3 is more than the 2 members"));
  await panel.screenshot({ path: join(SHOTS, "council-form-error.png") });

  await openCouncil(ada, { question: "Capital of France?", agents: 3, quorum: 2 });
  const [decided] = await until("the council decides", () => councils(ada), (l) => l.length === 1 && l[0].state === "decided", 15_000);
  const answer = await ada.getByTestId("council-answer").innerText();
  assert.equal(answer.trim().toLowerCase(), "paris");
  const dissent = await ada.getByTestId("council-dissent").innerText();
  assert.match(dissent, /Lyon/, "the dissent names the losing answer");
  assert.match(decided.text, /Proposals/);
  assert.match(decided.text, /Reviews/);
  for (const label of ["A", "B", "C"]) assert.match(decided.text, new RegExp(`Reviewer ${label}`));
  assert.match(decided.text, /by majority/);
  // Bob follows the same council live.
  await until("Bob sees the decision", () => councils(bob), (l) => l.length === 1 && l[0].state === "decided"
    && /Decision: paris/i.test(l[0].text));
  await shot(ada, "council-agents-ada");
});

test("a person who is a member answers with a ballot", STEP, async () => {
  await openCouncil(ada, { question: "And the capital of Italy?", agents: 2, people: ["Ada (you)"], quorum: 2 });
  const ballot = ada.getByTestId("ballot");
  await until("Ada is asked for her answer", () => ballot.getAttribute("data-phase"), (p) => p === "propose");
  assert.equal(await bob.getByTestId("ballot").count(), 0, "Bob is not a member");
  await ballot.getByTestId("ballot-confidence").fill("1.5");
  await ballot.getByTestId("ballot-answer").fill("Paris");
  await ballot.getByTestId("ballot-submit").click();
  await until("a clear message for a bad confidence", () => ballot.locator(".field-error").innerText(), (t) => /0 to 1/.test(t));
  await ballot.getByTestId("ballot-confidence").fill("0.7");
  await ballot.getByTestId("ballot-submit").click();

  await until("Ada is asked to rank the others", () => ada.getByTestId("ballot").getAttribute("data-phase").catch(() => null),
    (p) => p === "review");
  const ranking = ada.getByTestId("ballot-ranking");
  const labels = await ranking.locator("li").evaluateAll((items) => items.map((li) => li.dataset.label));
  assert.equal(labels.length, 2, `the two agents' proposals, not Ada's own: ${labels}`);
  await shot(ada, "council-ballot-ada");
  // Keyboard only: move the first proposal down.
  await ranking.getByRole("button", { name: `Move ${labels[0]} down` }).focus();
  await ada.keyboard.press("Enter");
  const reordered = await ranking.locator("li").evaluateAll((items) => items.map((li) => li.dataset.label));
  assert.deepEqual(reordered, [labels[1], labels[0]]);
  await ada.getByTestId("ballot-submit").click();

  const list = await until("the council with Ada decides", () => councils(ada),
    (l) => l.length === 2 && l[0].state === "decided", 15_000);
  assert.match(list[0].text, /Decision: paris/i);
  assert.match(list[0].text, /\(you\)|you/);
  await until("Bob sees it decided", () => councils(bob), (l) => l.length === 2 && l[0].state === "decided");
  await shot(ada, "council-person-ada");
  await shot(bob, "council-bob-900px");
});

test("the page reads well on a phone, in dark mode", STEP, async () => {
  const phone = await person("Cy", { viewport: { width: 390, height: 844 }, colorScheme: "dark", isMobile: true, hasTouch: true });
  await until("Cy sees the decided councils", () => councils(phone), (l) => l.length === 2 && l.every((c) => c.state === "decided"));
  await until("Cy sees the tasks", () => tasks(phone), (l) => l.length === 2);
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `nothing is wider than the screen (by ${overflow}px)`);
  // A whole phone page is too tall to read in one picture: the first screen, then each panel.
  await phone.screenshot({ path: join(SHOTS, "phone-dark-top.png") });
  for (const panel of ["presence", "workers", "tasks", "council"]) {
    await phone.getByTestId(panel).screenshot({ path: join(SHOTS, `phone-dark-${panel}.png`) });
  }
  await phone.context().close();
});

test("no page reported an error", async () => {
  assert.deepEqual(problems, []);
});
