// The Conclave web page: pick a session, join it, chat, and see who is here.
//
// User data only ever reaches the DOM through textContent and attributes; never innerHTML.

import { ConclaveClient, SESSION_NAME } from "./client.js";

const TOKEN_KEY = "conclave.token";
const NAME_KEY = "conclave.name";
const MAX_NAME = 64;
const BACKLOG = 100; // chat history fetched on a fresh join
const IDLE_AFTER_MS = 60_000;
const TYPING_FOR_MS = 3_000;
const PRESENCE_MIN_GAP_MS = 300; // at most ~3 presence frames a second

const $ = (id) => document.getElementById(id);

const ui = {
  main: $("main"),
  joinView: $("join-view"),
  joinForm: $("join-form"),
  sessionInput: $("session-input"),
  sessionError: $("session-error"),
  nameInput: $("name-input"),
  nameError: $("name-error"),
  tokenInput: $("token-input"),
  tokenDetails: $("token-details"),
  createNew: $("create-new"),
  sessionView: $("session-view"),
  sessionInfo: $("session-info"),
  sessionName: $("session-name"),
  userName: $("user-name"),
  copyLink: $("copy-link"),
  leave: $("leave"),
  conn: $("conn"),
  connText: $("conn-text"),
  retryNow: $("retry-now"),
  errorBanner: $("error-banner"),
  errorText: $("error-text"),
  errorDismiss: $("error-dismiss"),
  resetBanner: $("reset-banner"),
  chatLog: $("chat-log"),
  chatForm: $("chat-form"),
  chatInput: $("chat-input"),
  chatStatus: $("chat-status"),
  presence: $("presence"),
  presenceCount: $("presence-count"),
};

/** Everything about the session on screen; replaced on every join. */
let view = null;

// ---- small helpers ----------------------------------------------------------------------------

const storage = {
  get(key) {
    try {
      return localStorage.getItem(key) || "";
    } catch {
      return "";
    }
  },
  set(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      /* storage may be unavailable (private mode); nothing to do */
    }
  },
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") for (const [p, v] of Object.entries(value)) node.style.setProperty(p, v);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

/** A stable hue from a user id, for the colour that marks a person. */
function hueOf(id) {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) {
    h ^= id.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return (h >>> 0) % 360;
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return { short: "", full: "" };
  const sameDay = date.toDateString() === new Date().toDateString();
  const short = sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  return { short, full: date.toLocaleString() };
}

function randomSessionName() {
  const adjectives = ["amber", "brisk", "calm", "deft", "eager", "fair", "glad", "keen", "lucid", "merry",
    "noble", "quiet", "rapid", "sage", "tidy", "vivid", "warm", "witty"];
  const nouns = ["badger", "cedar", "comet", "delta", "ember", "fjord", "harbor", "lantern", "maple",
    "meadow", "orbit", "otter", "pine", "quartz", "river", "summit", "tern", "willow"];
  const bytes = new Uint32Array(3);
  crypto.getRandomValues(bytes);
  const tail = (bytes[2] % 36 ** 4).toString(36).padStart(4, "0");
  return `${adjectives[bytes[0] % adjectives.length]}-${nouns[bytes[1] % nouns.length]}-${tail}`;
}

function validateSession(value) {
  if (!value) return "Enter a session name, or create a new one.";
  if (value.length > 128) return "A session name has at most 128 characters.";
  if (!SESSION_NAME.test(value)) return "Use only letters, digits, “.”, “_” and “-”.";
  return "";
}

function validateName(value) {
  if (!value.trim()) return "Enter the name others will see.";
  if ([...value].length > MAX_NAME) return `A display name has at most ${MAX_NAME} characters.`;
  return "";
}

function showFieldError(input, errorNode, message) {
  errorNode.textContent = message;
  errorNode.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

// ---- banners ----------------------------------------------------------------------------------

function showError(message) {
  ui.errorText.textContent = message;
  ui.errorBanner.hidden = false;
}

function hideError() {
  ui.errorBanner.hidden = true;
  ui.errorText.textContent = "";
}

ui.errorDismiss.addEventListener("click", hideError);

// ---- connection indicator ---------------------------------------------------------------------

let countdownTimer = null;

function renderConnection(detail) {
  clearInterval(countdownTimer);
  countdownTimer = null;
  const { state } = detail;
  ui.conn.dataset.state = state;
  ui.retryNow.hidden = !(state === "reconnecting" || state === "offline") || !view;
  ui.conn.title = detail.reason || "";
  if (state === "reconnecting" && detail.retryAt) {
    const tick = () => {
      const seconds = Math.max(0, Math.ceil((detail.retryAt - Date.now()) / 1000));
      ui.connText.textContent = seconds > 0 ? `Reconnecting in ${seconds}s` : "Reconnecting…";
    };
    tick();
    countdownTimer = setInterval(tick, 1000);
    return;
  }
  ui.connText.textContent = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline",
    stopped: "Not connected",
  }[state] || state;
}

ui.retryNow.addEventListener("click", () => view?.client.reconnectNow());

// ---- chat log ---------------------------------------------------------------------------------

function nearBottom(node) {
  return node.scrollHeight - node.scrollTop - node.clientHeight < 48;
}

/** Inserts an entry in offset order, so history fetched late still lands in place. */
function insertEntry(offset, item) {
  if (!view || view.entries.has(offset)) return;
  const log = ui.chatLog;
  const stick = nearBottom(log);
  item.dataset.offset = String(offset);
  view.entries.set(offset, item);
  let before = null;
  for (let node = log.lastElementChild; node; node = node.previousElementSibling) {
    const at = Number(node.dataset.offset);
    if (at < offset) break;
    before = node;
  }
  log.insertBefore(item, before);
  if (stick || !before) log.scrollTop = log.scrollHeight;
}

function timeNode(at) {
  const { short, full } = formatTime(at);
  return el("time", { class: "msg-time", datetime: at, title: full, text: short });
}

function renderChat(event) {
  const actor = event.actor || {};
  const text = typeof event.data?.text === "string" ? event.data.text : "";
  const mine = view && actor.id === view.client.user?.id;
  const item = el("li", { class: mine ? "msg msg-mine" : "msg", "data-kind": "chat" },
    el("div", { class: "msg-head" },
      el("span", { class: "msg-author", style: { "--hue": String(hueOf(actor.id || "")) }, text: actor.name || "anonymous" }),
      timeNode(event.at)),
    el("p", { class: "msg-text", text }));
  insertEntry(event.offset, item);
}

function renderSystem(event, text) {
  const item = el("li", { class: "sys", "data-kind": event.kind },
    el("span", { class: "sys-text", text }), timeNode(event.at));
  insertEntry(event.offset, item);
}

function userOf(event) {
  const user = event.data?.user;
  return user && typeof user === "object" ? user : event.actor || {};
}

/** What each event kind does. Later panels (tasks, councils) add their kinds here. */
const eventKinds = {
  chat: (event) => renderChat(event),
  "member.joined": (event) => {
    const user = userOf(event);
    renderSystem(event, `${user.name || "someone"} joined`);
    if (!event.replayed && user.id) {
      view.members.set(user.id, user);
      renderPresence();
    }
  },
  "member.left": (event) => {
    const user = userOf(event);
    renderSystem(event, `${user.name || "someone"} left`);
    if (!event.replayed && user.id) {
      view.members.delete(user.id);
      renderPresence();
    }
  },
};

function onEvent(event) {
  if (!view || event.session !== view.session) return;
  const handle = eventKinds[event.kind];
  if (handle) handle(event);
}

/** On a fresh join, shows the recent history the socket does not replay. */
async function fetchBacklog(upto) {
  const current = view;
  if (upto <= 0) return;
  const after = Math.max(0, upto - BACKLOG);
  const headers = { Accept: "application/json" };
  if (current.token) headers.Authorization = `Bearer ${current.token}`;
  try {
    const response = await fetch(
      `/v1/sessions/${encodeURIComponent(current.session)}/events?after=${after}&limit=${BACKLOG}`,
      { headers, cache: "no-store" });
    if (!response.ok) return;
    const page = await response.json();
    if (view !== current || current.resetAt !== null) return;
    for (const event of page.events || []) {
      if (typeof event.offset !== "number" || event.offset > upto) continue;
      onEvent({ ...event, session: current.session, replayed: true });
    }
  } catch {
    /* history is a convenience; live events still flow */
  }
}

// ---- presence ---------------------------------------------------------------------------------

const STATUS_TEXT = { active: "active", typing: "typing…", idle: "idle" };

function renderPresence() {
  if (!view) return;
  // People: the members, plus anyone whose presence arrived before their member event.
  const people = new Map(view.members);
  const connsByUser = new Map();
  for (const entry of view.presence.values()) {
    const user = entry.user || {};
    if (!user.id) continue;
    if (!people.has(user.id)) people.set(user.id, user);
    if (!connsByUser.has(user.id)) connsByUser.set(user.id, []);
    connsByUser.get(user.id).push(entry);
  }
  const meId = view.client.user?.id;
  const sorted = [...people.values()].sort((a, b) => {
    if (a.id === meId) return -1;
    if (b.id === meId) return 1;
    return (a.name || "").localeCompare(b.name || "") || a.id.localeCompare(b.id);
  });

  const items = sorted.map((user) => {
    const hue = String(hueOf(user.id));
    const name = user.name || "anonymous";
    const statuses = el("span", { class: "statuses" });
    const conns = connsByUser.get(user.id) || [];
    if (conns.length === 0) {
      statuses.append(el("span", { class: "status status-none", text: "here" }));
    }
    for (const entry of conns) {
      const raw = entry.state && typeof entry.state.status === "string" ? entry.state.status : "";
      const status = Object.hasOwn(STATUS_TEXT, raw) ? raw : "other";
      statuses.append(el("span", {
        class: `status status-${status}`,
        "data-conn": entry.conn,
        text: STATUS_TEXT[raw] || raw || "here",
      }));
    }
    const label = el("span", { class: "member-name", text: name });
    if (user.id === meId) label.append(el("span", { class: "you", text: " (you)" }));
    return el("li", { class: "member", "data-user": user.id, style: { "--hue": hue } },
      el("span", { class: "avatar", "aria-hidden": "true", text: [...name.trim()][0]?.toUpperCase() || "?" }),
      el("span", { class: "member-body" },
        label,
        user.role ? el("span", { class: "role", text: user.role }) : null),
      statuses);
  });
  ui.presence.replaceChildren(...items);
  ui.presenceCount.textContent = `(${items.length})`;
}

function onPresence(frame) {
  if (!view || frame.session !== view.session || !frame.conn) return;
  if (frame.gone) {
    view.presence.delete(frame.conn);
  } else {
    const previous = view.presence.get(frame.conn);
    view.presence.set(frame.conn, {
      conn: frame.conn,
      user: frame.user || previous?.user || null,
      state: frame.state ?? null,
    });
  }
  renderPresence();
}

/** Our own presence: coalesced, rate-limited, and idle after a minute without input. */
class PresenceReporter {
  constructor(client, session) {
    this.client = client;
    this.session = session;
    this.state = { status: "active" };
    this.sentJson = null;
    this.lastSentAt = 0;
    this.sendTimer = null;
    this.typingTimer = null;
    this.idleTimer = null;
    this.onActivity = () => this.activity();
    for (const type of ["keydown", "pointerdown", "pointermove", "wheel", "focusin", "touchstart"]) {
      window.addEventListener(type, this.onActivity, { passive: true, capture: true });
    }
    this.armIdle();
  }

  set(patch) {
    const next = { ...this.state, ...patch };
    if (JSON.stringify(next) === JSON.stringify(this.state) && this.sentJson !== null) return;
    this.state = next;
    this.schedule();
  }

  schedule() {
    if (this.sendTimer) return;
    const wait = Math.max(0, this.lastSentAt + PRESENCE_MIN_GAP_MS - Date.now());
    this.sendTimer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    this.sendTimer = null;
    const json = JSON.stringify(this.state);
    if (json === this.sentJson) return;
    // Remembered by the client even while offline, and sent again after each rejoin.
    this.client.setPresence(this.session, { ...this.state });
    this.sentJson = json;
    this.lastSentAt = Date.now();
  }

  typing() {
    this.set({ status: "typing" });
    clearTimeout(this.typingTimer);
    this.typingTimer = setTimeout(() => this.set({ status: "active" }), TYPING_FOR_MS);
  }

  stoppedTyping() {
    clearTimeout(this.typingTimer);
    this.set({ status: "active" });
  }

  activity() {
    if (this.state.status === "idle") this.set({ status: "active" });
    this.armIdle();
  }

  armIdle() {
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => {
      clearTimeout(this.typingTimer);
      this.set({ status: "idle" });
    }, IDLE_AFTER_MS);
  }

  dispose() {
    clearTimeout(this.sendTimer);
    clearTimeout(this.typingTimer);
    clearTimeout(this.idleTimer);
    for (const type of ["keydown", "pointerdown", "pointermove", "wheel", "focusin", "touchstart"]) {
      window.removeEventListener(type, this.onActivity, { capture: true });
    }
  }
}

// ---- chat input -------------------------------------------------------------------------------

function setChatStatus(message, kind = "", reason = "") {
  ui.chatStatus.textContent = message;
  ui.chatStatus.dataset.kind = kind;
  ui.chatStatus.dataset.reason = reason;
}

async function sendChat() {
  if (!view || view.sending) return;
  const text = ui.chatInput.value;
  if (!text.trim()) return;
  const current = view;
  current.sending = true;
  ui.chatInput.readOnly = true;
  ui.chatInput.setAttribute("aria-busy", "true");
  setChatStatus("Sending…");
  try {
    await current.client.chat(current.session, text);
    if (view !== current) return;
    ui.chatInput.value = "";
    setChatStatus("");
    current.reporter.stoppedTyping();
  } catch (error) {
    if (view !== current) return;
    const reason = error.code === "disconnected" ? "not connected to the server"
      : error.code === "timeout" ? "the server did not answer"
        : `${error.message || error.code}`;
    const local = error.code === "disconnected" || error.code === "timeout";
    setChatStatus(`Not sent: ${reason}${local || !error.code ? "" : ` (${error.code})`}`, "error", error.code || "");
  } finally {
    if (view === current) {
      current.sending = false;
      ui.chatInput.readOnly = false;
      ui.chatInput.removeAttribute("aria-busy");
    }
  }
}

ui.chatForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sendChat();
});

ui.chatInput.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendChat();
  }
});

ui.chatInput.addEventListener("input", () => {
  if (!view) return;
  if (ui.chatStatus.dataset.kind === "error") setChatStatus("");
  if (ui.chatInput.value.trim()) view.reporter.typing();
  else view.reporter.stoppedTyping();
});

// ---- joining and leaving ----------------------------------------------------------------------

function showJoinForm() {
  ui.sessionView.hidden = true;
  ui.sessionInfo.hidden = true;
  ui.joinView.hidden = false;
  document.title = "Conclave";
}

function shareUrl(session, name) {
  const params = new URLSearchParams({ session, name });
  return `${location.pathname}?${params}`;
}

function startSession(session, name, token) {
  stopSession();
  hideError();
  const client = new ConclaveClient({ name, token });
  view = {
    client,
    session,
    name,
    token,
    members: new Map(),
    presence: new Map(),
    entries: new Map(),
    joinedOnce: false,
    resetAt: null,
    sending: false,
    reporter: new PresenceReporter(client, session),
  };
  const current = view;

  ui.chatLog.replaceChildren();
  ui.resetBanner.hidden = true;
  setChatStatus("");
  ui.chatInput.value = "";
  renderPresence();

  ui.joinView.hidden = true;
  ui.sessionView.hidden = false;
  ui.sessionInfo.hidden = false;
  ui.sessionName.textContent = session;
  ui.userName.textContent = name;
  document.title = `${session} · Conclave`;

  client.addEventListener("state", (e) => {
    if (view !== current) return;
    renderConnection(e.detail);
    // A "not connected" failure is stale once the connection is back; the text is still there
    // to send again.
    if (e.detail.state === "live" && ui.chatStatus.dataset.reason === "disconnected") setChatStatus("");
  });
  client.addEventListener("welcome", (e) => {
    if (view === current && e.detail.user?.name) ui.userName.textContent = e.detail.user.name;
  });
  client.addEventListener("joined", (e) => {
    if (view !== current || e.detail.session !== session) return;
    const frame = e.detail;
    current.members = new Map((frame.members || []).filter((u) => u && u.id).map((u) => [u.id, u]));
    current.presence = new Map((frame.presence || []).filter((p) => p && p.conn).map((p) => [p.conn, p]));
    renderPresence();
    if (!current.joinedOnce) {
      current.joinedOnce = true;
      history.replaceState(null, "", shareUrl(session, name));
      current.reporter.flush();
      fetchBacklog(frame.offset);
    }
  });
  client.addEventListener("event", (e) => onEvent(e.detail));
  client.addEventListener("presence", (e) => onPresence(e.detail));
  client.addEventListener("reset", (e) => {
    if (view !== current || e.detail.session !== session) return;
    current.resetAt = Date.now();
    current.entries.clear();
    ui.chatLog.replaceChildren();
    ui.resetBanner.hidden = false;
  });
  client.addEventListener("archived", (e) => {
    if (view !== current || e.detail.session !== session) return;
    showError(`Session “${session}” was archived.`);
    stopSession();
    showJoinForm();
  });
  client.addEventListener("joinfailed", (e) => {
    if (view !== current || e.detail.session !== session) return;
    const { error } = e.detail;
    if (error.code === "disconnected" || error.code === "timeout") return; // rejoined later
    showError(`Could not join “${session}”: ${error.message} (${error.code})`);
    stopSession();
    showJoinForm();
  });
  client.addEventListener("error", (e) => {
    if (view !== current) return;
    const frame = e.detail;
    const text = `${frame.message || "The server reported an error"} (${frame.code || "error"})`;
    if (client.state === "offline" && frame.code === "unauthorized") {
      // The hello was refused: a (valid) token is needed.
      showError(`Could not connect: ${text}. Enter an access token to continue.`);
      stopSession();
      showJoinForm();
      ui.tokenDetails.open = true;
      ui.tokenInput.focus();
    } else {
      showError(text);
    }
  });

  client.start();
  client.join(session).catch(() => {});
  ui.chatInput.focus();
}

function stopSession() {
  if (!view) return;
  const old = view;
  view = null;
  old.reporter.dispose();
  old.client.stop();
  clearInterval(countdownTimer);
  renderConnection({ state: "stopped" });
}

ui.leave.addEventListener("click", async () => {
  if (!view) return;
  const { client, session } = view;
  try {
    await client.leave(session);
  } catch {
    /* leaving is best effort: stopping closes the socket anyway */
  }
  stopSession();
  history.replaceState(null, "", location.pathname);
  ui.sessionInput.value = session;
  showJoinForm();
  ui.sessionInput.focus();
});

ui.copyLink.addEventListener("click", async () => {
  const link = location.href;
  const label = ui.copyLink.textContent;
  try {
    await navigator.clipboard.writeText(link);
    ui.copyLink.textContent = "Link copied";
  } catch {
    ui.copyLink.textContent = "Copy from the address bar";
  }
  setTimeout(() => (ui.copyLink.textContent = label), 2000);
});

ui.createNew.addEventListener("click", () => {
  ui.sessionInput.value = randomSessionName();
  showFieldError(ui.sessionInput, ui.sessionError, "");
  ui.joinForm.requestSubmit();
});

ui.sessionInput.addEventListener("input", () => {
  if (ui.sessionInput.getAttribute("aria-invalid")) {
    showFieldError(ui.sessionInput, ui.sessionError, validateSession(ui.sessionInput.value.trim()));
  }
});

ui.nameInput.addEventListener("input", () => {
  if (ui.nameInput.getAttribute("aria-invalid")) {
    showFieldError(ui.nameInput, ui.nameError, validateName(ui.nameInput.value));
  }
});

ui.joinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const session = ui.sessionInput.value.trim();
  const name = ui.nameInput.value.trim();
  const token = ui.tokenInput.value.trim();
  const sessionProblem = validateSession(session);
  const nameProblem = validateName(name);
  showFieldError(ui.sessionInput, ui.sessionError, sessionProblem);
  showFieldError(ui.nameInput, ui.nameError, nameProblem);
  if (sessionProblem) return ui.sessionInput.focus();
  if (nameProblem) return ui.nameInput.focus();
  storage.set(TOKEN_KEY, token);
  storage.set(NAME_KEY, name);
  startSession(session, name, token);
});

// ---- start ------------------------------------------------------------------------------------

function init() {
  const params = new URLSearchParams(location.search);
  const session = (params.get("session") || "").trim();
  const name = (params.get("name") || "").trim() || storage.get(NAME_KEY);
  const token = storage.get(TOKEN_KEY);
  ui.sessionInput.value = session;
  ui.nameInput.value = name;
  ui.tokenInput.value = token;
  if (token) ui.tokenDetails.open = true;
  renderConnection({ state: "stopped" });

  if (session) {
    const sessionProblem = validateSession(session);
    const nameProblem = validateName(name);
    if (!sessionProblem && !nameProblem) {
      startSession(session, name, token);
      return;
    }
    showFieldError(ui.sessionInput, ui.sessionError, sessionProblem);
    if (!sessionProblem) showFieldError(ui.nameInput, ui.nameError, nameProblem);
  }
  showJoinForm();
  (session && !validateSession(session) ? ui.nameInput : ui.sessionInput).focus();
}

init();
