// The Conclave web page: pick a session, join it, chat, edit its documents, see who is here, and
// hand the session's tasks and councils to their panels (tasks.js, council.js, workers.js).
//
// User data only ever reaches the DOM through textContent and attributes; never innerHTML.

import { ConclaveClient, RequestError, SESSION_NAME } from "./client.js";
import { CouncilPanel } from "./council.js";
import { DocClient } from "./doc-client.js";
import { el, hueOf, showFieldError, timeNode } from "./dom.js";
import { splitsPair, transformCaret } from "./ot.js";
import { restJson, sessionPath } from "./rest.js";
import { TasksPanel } from "./tasks.js";
import { WorkersPanel } from "./workers.js";

const TOKEN_KEY = "conclave.token";
const NAME_KEY = "conclave.name";
const MAX_NAME = 64;
const BACKLOG = 100; // chat-log entries (messages, joins, leaves) shown from before a join
const HISTORY_PAGE = 1000; // events per REST page when the panels rebuild from the log
const IDLE_AFTER_MS = 60_000;
const TYPING_FOR_MS = 3_000;
const PRESENCE_MIN_GAP_MS = 300; // at most ~3 presence frames a second
const DEFAULT_DOC = "main";
const DOC_NAME = SESSION_NAME; // document names follow the same rule
const CURSOR_DEBOUNCE_MS = 120;

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
  editor: $("editor"),
  editorWrap: $("editor-wrap"),
  cursorLayer: $("cursor-layer"),
  cursors: $("cursors"),
  docSelect: $("doc-select"),
  docOpenForm: $("doc-open-form"),
  docName: $("doc-name"),
  docOpen: $("doc-open"),
  docNameError: $("doc-name-error"),
  docStatus: $("doc-status"),
  docStatusText: $("doc-status-text"),
  docVersion: $("doc-version"),
  docNotice: $("doc-notice"),
  docNoticeText: $("doc-notice-text"),
  docNoticeDismiss: $("doc-notice-dismiss"),
};

/** Everything about the session on screen; replaced on every join. */
let view = null;

const tasksPanel = new TasksPanel();
const councilPanel = new CouncilPanel();
const workersPanel = new WorkersPanel((kinds) => tasksPanel.setKinds(kinds));

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

/** What each chat-log event kind does; `task.*` and `council.*` go to their panels. */
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

/** Feeds an event to the tasks or councils panel; false if it is neither's. */
function panelEvent(event) {
  const kind = typeof event.kind === "string" ? event.kind : "";
  if (kind.startsWith("task.")) tasksPanel.onEvent(event);
  else if (kind.startsWith("council.")) councilPanel.onEvent(event);
  else return false;
  return true;
}

function onEvent(event) {
  if (!view || event.session !== view.session) return;
  if (panelEvent(event)) return;
  const handle = eventKinds[event.kind];
  if (!handle) return;
  // People's names outlive their presence: councils name members who have left.
  const user = event.kind === "chat" ? event.actor : userOf(event);
  if (user?.id && user.name) view.names.set(user.id, user.name);
  handle(event);
}

/**
 * Rebuilds from the session's log over REST what the socket does not replay: on a fresh join (up
 * to its snapshot's offset) and after a `reset` (to the end of the log, Infinity). The tasks and
 * councils panels fold every event; the chat shows the last BACKLOG of its own kinds. Live events
 * keep flowing meanwhile; every consumer takes an event at most once by its offset, in any order.
 */
async function loadHistory(current, upto) {
  const run = ++current.historyRun;
  const recent = [];
  let after = 0;
  while (after < upto) {
    let page;
    try {
      page = await restJson(sessionPath(current.session, `/events?after=${after}&limit=${HISTORY_PAGE}`),
        { token: current.token });
    } catch (error) {
      if (view === current && current.historyRun === run) {
        showError(`Could not load this session’s history: ${error.message} (${error.code}). Live events still arrive.`);
      }
      return;
    }
    if (view !== current || current.historyRun !== run) return;
    const events = Array.isArray(page?.events) ? page.events : [];
    for (const event of events) {
      if (typeof event.offset !== "number" || event.offset > upto) continue;
      const replayed = { ...event, session: current.session, replayed: true };
      if (panelEvent(replayed) || !eventKinds[event.kind]) continue;
      const user = event.kind === "chat" ? event.actor : userOf(event);
      if (user?.id && user.name) current.names.set(user.id, user.name);
      recent.push(replayed);
      if (recent.length > BACKLOG * 2) recent.splice(0, recent.length - BACKLOG);
    }
    if (events.length < HISTORY_PAGE) break;
    after = events[events.length - 1].offset;
  }
  for (const event of recent.slice(-BACKLOG)) onEvent(event);
  councilPanel.refreshOpen();
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
    // One badge per distinct status: a person with two tabs is one person, not two.
    const byStatus = new Map();
    for (const entry of conns) {
      const raw = entry.state && typeof entry.state.status === "string" ? entry.state.status : "";
      if (!byStatus.has(raw)) byStatus.set(raw, []);
      byStatus.get(raw).push(entry.conn);
    }
    for (const [raw, connIds] of byStatus) {
      const status = Object.hasOwn(STATUS_TEXT, raw) ? raw : "other";
      const text = STATUS_TEXT[raw] || raw || "here";
      statuses.append(el("span", {
        class: `status status-${status}`,
        "data-conn": connIds.join(" "),
        title: connIds.length > 1 ? `${text} in ${connIds.length} tabs` : text,
        text: connIds.length > 1 ? `${text} ×${connIds.length}` : text,
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
  councilPanel.renderPeople();
}

/** Everyone known to be in the session: its members, and anyone whose presence came first. */
function peopleOf(current) {
  const people = new Map(current.members);
  for (const entry of current.presence.values()) {
    if (entry.user?.id && !people.has(entry.user.id)) people.set(entry.user.id, entry.user);
  }
  return [...people.values()].map((u) => ({ id: u.id, name: u.name || "" }));
}

/** A council member's name (`user:<id>` or `worker:<id>`), or "" when it is not known here. */
function memberName(current, memberId) {
  const [kind, id] = memberId.split(/:(.*)/s);
  if (kind === "worker") return workersPanel.nameOf(id) ? `agent ${workersPanel.nameOf(id)}` : "";
  if (kind === "user") return peopleOf(current).find((p) => p.id === id)?.name || current.names.get(id) || "";
  return "";
}

function onPresence(frame) {
  if (!view || frame.session !== view.session || !frame.conn) return;
  if (frame.gone) {
    view.presence.delete(frame.conn);
    view.cursors.delete(frame.conn);
    renderCursors();
  } else {
    const previous = view.presence.get(frame.conn);
    view.presence.set(frame.conn, {
      conn: frame.conn,
      user: frame.user || previous?.user || null,
      state: frame.state ?? null,
    });
    updateRemoteCursor(view.presence.get(frame.conn));
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

// ---- documents --------------------------------------------------------------------------------
//
// One DocClient (doc-client.js) per document of the session, kept up to date from doc frames
// whether or not it is on screen; the textarea shows the active one. User text only reaches the
// DOM as textarea value or textContent.

function docUrl(current, doc) {
  return `/v1/sessions/${encodeURIComponent(current.session)}/docs/${encodeURIComponent(doc)}`;
}

/** The transport a DocClient talks through: edits over the socket, reloads over REST. */
function docTransport(current) {
  return {
    sendEdit(doc, base, ops) {
      const entry = current.client.sessions.get(current.session);
      if (!current.client.canSend || !entry?.joined) {
        // Not written to any socket, so surely not applied.
        const error = new RequestError("disconnected", "not connected to the server");
        error.unsent = true;
        return Promise.reject(error);
      }
      return current.client.request({ type: "edit", session: current.session, doc, base, ops });
    },
    async fetchDoc(doc) {
      const headers = { Accept: "application/json" };
      if (current.token) headers.Authorization = `Bearer ${current.token}`;
      const response = await fetch(docUrl(current, doc), { headers, cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      if (typeof body?.version !== "number" || typeof body?.text !== "string") throw new Error("bad document");
      return body;
    },
  };
}

/** The DocClient for `name`, made on first use from a snapshot (or empty at version 0). */
function ensureDoc(current, name, snapshot = null) {
  let dc = current.docs.get(name);
  if (dc) return dc;
  dc = new DocClient({
    name,
    version: snapshot?.version ?? 0,
    text: snapshot?.text ?? "",
    transport: docTransport(current),
    onChange: (change) => onDocChange(current, dc, change),
    onState: () => {
      if (view === current && current.activeDoc === name) renderDocStatus();
    },
    onNotice: (notice) => {
      if (view !== current) return;
      showDocNotice(current.activeDoc === name ? notice.message : `“${name}”: ${notice.message}`);
    },
  });
  current.docs.set(name, dc);
  renderDocList();
  return dc;
}

function activeDoc() {
  return view ? view.docs.get(view.activeDoc) || null : null;
}

function renderDocList() {
  if (!view) return;
  const names = [...view.docs.keys()].sort((a, b) =>
    (a === DEFAULT_DOC ? -1 : b === DEFAULT_DOC ? 1 : a.localeCompare(b)));
  const options = names.map((name) => {
    const option = el("option", { value: name, text: name });
    if (name === view.activeDoc) option.selected = true;
    return option;
  });
  ui.docSelect.replaceChildren(...options);
  ui.docSelect.value = view.activeDoc;
}

function renderDocStatus() {
  const dc = activeDoc();
  let state = "idle";
  let text = "";
  if (dc) {
    if (dc.loading) [state, text] = ["loading", "Loading…"];
    else if (dc.offline && dc.saving) [state, text] = ["offline", "Offline: changes kept until reconnected"];
    else if (dc.offline) [state, text] = ["offline", "Offline"];
    else if (dc.saving) [state, text] = ["saving", "Saving…"];
    else [state, text] = ["saved", "Saved"];
  }
  ui.docStatus.dataset.state = state;
  ui.docStatus.dataset.version = dc ? String(dc.version) : "";
  if (ui.docStatusText.textContent !== text) ui.docStatusText.textContent = text;
  ui.docVersion.textContent = dc ? `v${dc.version}` : "";
  ui.docVersion.title = dc ? `Version ${dc.version} of “${dc.name}” on the server` : "";
  ui.editor.readOnly = !dc || dc.loading || !view?.mayWrite;
}

function showDocNotice(message) {
  ui.docNoticeText.textContent = message;
  ui.docNotice.hidden = false;
}

function hideDocNotice() {
  ui.docNotice.hidden = true;
  ui.docNoticeText.textContent = "";
}

ui.docNoticeDismiss.addEventListener("click", hideDocNotice);

/** Shows the active document in the textarea, with the selection it had last time. */
function showActiveDoc() {
  const dc = activeDoc();
  if (!dc) return;
  const ta = ui.editor;
  ta.value = dc.text;
  const sel = view.selections.get(dc.name);
  if (sel) {
    ta.setSelectionRange(Math.min(sel.start, dc.text.length), Math.min(sel.end, dc.text.length), sel.dir);
    ta.scrollTop = sel.scrollTop;
  } else {
    ta.setSelectionRange(0, 0);
    ta.scrollTop = 0;
  }
  renderDocList();
  renderDocStatus();
  renderCursors();
  reportCursor();
}

function rememberSelection() {
  const dc = activeDoc();
  if (!dc) return;
  const ta = ui.editor;
  view.selections.set(dc.name, {
    start: ta.selectionStart, end: ta.selectionEnd, dir: ta.selectionDirection, scrollTop: ta.scrollTop,
  });
}

function switchDoc(name) {
  if (!view || !DOC_NAME.test(name)) return;
  if (view.activeDoc === name && view.docs.has(name)) return;
  rememberSelection();
  const known = view.docs.has(name);
  const dc = ensureDoc(view, name);
  view.activeDoc = name;
  hideDocNotice();
  history.replaceState(null, "", shareUrl(view.session, view.name, name));
  // A document we have not heard of yet is most likely new; read it to be sure.
  if (!known && view.joinedOnce) dc.reload(null, "open");
  showActiveDoc();
}

/** A change the DocClient made to a document's text (a remote edit or a reload). */
function onDocChange(current, dc, { text, op, actor }) {
  if (view !== current) return;
  // Remote cursors move through the change; a person's own insert pushes their caret along.
  for (const cursor of current.cursors.values()) {
    if (cursor.doc !== dc.name) continue;
    const own = actor && cursor.user?.id === actor.id;
    cursor.anchor = transformCaret(cursor.anchor, op, own);
    cursor.head = transformCaret(cursor.head, op, own);
  }
  if (current.activeDoc === dc.name) {
    const ta = ui.editor;
    const { selectionStart, selectionEnd, selectionDirection, scrollTop } = ta;
    if (ta.value !== text) {
      ta.value = text;
      // Our selection stays on the same characters: someone else's insert right at our caret
      // goes after it, and one at either edge of a selection stays outside it.
      const collapsed = selectionStart === selectionEnd;
      ta.setSelectionRange(transformCaret(selectionStart, op, !collapsed), transformCaret(selectionEnd, op, false),
        selectionDirection);
      ta.scrollTop = scrollTop;
    }
    // (Our published cursor is not re-sent: the others move it through the same change.)
  } else {
    const sel = current.selections.get(dc.name);
    if (sel) {
      sel.start = transformCaret(sel.start, op, false);
      sel.end = transformCaret(sel.end, op, false);
    }
  }
  renderCursors();
}

ui.editor.addEventListener("input", () => {
  const dc = activeDoc();
  if (!dc) return;
  const value = ui.editor.value;
  if (value === dc.text) return;
  let op;
  try {
    op = dc.localText(value);
  } catch {
    // Cannot happen for a textarea's own text; put the document back rather than diverge.
    ui.editor.value = dc.text;
    return;
  }
  for (const cursor of view.cursors.values()) {
    if (cursor.doc !== dc.name) continue;
    cursor.anchor = transformCaret(cursor.anchor, op, false);
    cursor.head = transformCaret(cursor.head, op, false);
  }
  view.reporter.typing();
  renderDocStatus();
  renderCursors();
  scheduleCursorReport();
});

ui.docSelect.addEventListener("change", () => switchDoc(ui.docSelect.value));

ui.docOpenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const name = ui.docName.value.trim();
  const problem = !name ? "Enter a document name."
    : name.length > 128 ? "A document name has at most 128 characters."
      : !DOC_NAME.test(name) ? "Use only letters, digits, “.”, “_” and “-”." : "";
  showFieldError(ui.docName, ui.docNameError, problem);
  if (problem) return ui.docName.focus();
  ui.docName.value = "";
  switchDoc(name);
  ui.editor.focus();
});

ui.docName.addEventListener("input", () => {
  if (ui.docName.getAttribute("aria-invalid")) showFieldError(ui.docName, ui.docNameError, "");
});

/** Takes the session's documents from a `joined` frame. */
function onDocsJoined(current, frame) {
  const listed = new Map();
  for (const d of Array.isArray(frame.docs) ? frame.docs : []) {
    if (d && typeof d.name === "string" && DOC_NAME.test(d.name)) listed.set(d.name, d);
  }
  if (!current.joinedOnce) {
    for (const [name, d] of listed) ensureDoc(current, name, d);
    const wanted = current.activeDoc;
    const dc = ensureDoc(current, wanted, listed.get(wanted));
    if (!listed.has(wanted) && wanted !== DEFAULT_DOC) dc.reload(null, "open");
    ui.editor.disabled = false;
    ui.docSelect.disabled = false;
    ui.docName.disabled = false;
    ui.docOpen.disabled = false;
    ui.editor.placeholder = current.mayWrite
      ? "Start typing. Everyone in the session sees it as you type."
      : "You can read this document but not edit it.";
    showActiveDoc();
    return;
  }
  // A rejoin, or (without ref) the server's fresh snapshot after a `reset`. (A DocClient that
  // drops local edits says so itself, replacing this general notice.)
  const reset = frame.ref === undefined || frame.ref === null;
  if (reset) showDocNotice("The server reset this session; documents were reloaded from its saved state.");
  for (const [name, dc] of current.docs) {
    dc.rejoined(listed.get(name) || { version: 0, text: "" }, reset);
  }
  for (const [name, d] of listed) ensureDoc(current, name, d);
  renderDocStatus();
}

function onDocFrame(frame) {
  if (!view || frame.session !== view.session || typeof frame.doc !== "string" || !DOC_NAME.test(frame.doc)) return;
  if (!view.joinedOnce) return; // the joined snapshot is still to come
  ensureDoc(view, frame.doc).remote(frame);
}

// ---- cursors: ours in presence, others' in a list and an overlay ------------------------------

let cursorTimer = null;

function scheduleCursorReport() {
  if (!view || cursorTimer) return;
  cursorTimer = setTimeout(() => {
    cursorTimer = null;
    reportCursor();
  }, CURSOR_DEBOUNCE_MS);
}

/** Publishes our selection in the active document (merged into the presence status). */
function reportCursor() {
  const dc = activeDoc();
  if (!dc) return;
  const ta = ui.editor;
  const backward = ta.selectionDirection === "backward";
  const anchor = backward ? ta.selectionEnd : ta.selectionStart;
  const head = backward ? ta.selectionStart : ta.selectionEnd;
  view.reporter.set({ cursor: { doc: dc.name, anchor, head } });
}

for (const type of ["select", "keyup", "mouseup", "focus"]) {
  ui.editor.addEventListener(type, () => scheduleCursorReport());
}
document.addEventListener("selectionchange", () => {
  if (document.activeElement === ui.editor) scheduleCursorReport();
});

/** Takes a remote cursor from a presence entry. */
function updateRemoteCursor(entry) {
  if (!view || !entry) return;
  const cursor = entry.state && typeof entry.state === "object" ? entry.state.cursor : null;
  const ok = cursor && typeof cursor.doc === "string" && Number.isSafeInteger(cursor.anchor) &&
    Number.isSafeInteger(cursor.head) && cursor.anchor >= 0 && cursor.head >= 0;
  if (!ok || entry.conn === view.client.conn) {
    if (view.cursors.delete(entry.conn)) renderCursors();
    return;
  }
  view.cursors.set(entry.conn, {
    conn: entry.conn, user: entry.user || {}, doc: cursor.doc, anchor: cursor.anchor, head: cursor.head,
  });
  renderCursors();
}

/** An index moved into the text and off the middle of a surrogate pair. */
function clampIndex(text, i) {
  let at = Math.max(0, Math.min(i, text.length));
  if (splitsPair(text, at)) at -= 1;
  return at;
}

function lineCol(text, index) {
  const before = text.slice(0, index);
  const line = before.split("\n").length;
  const col = [...before.slice(before.lastIndexOf("\n") + 1)].length + 1;
  return { line, col };
}

let cursorFrame = 0;

function renderCursors() {
  if (cursorFrame) return;
  cursorFrame = requestAnimationFrame(() => {
    cursorFrame = 0;
    drawCursors();
  });
}

function drawCursors() {
  if (!view) {
    ui.cursors.replaceChildren();
    ui.cursorLayer.replaceChildren();
    return;
  }
  const dc = activeDoc();
  const text = dc ? dc.text : "";
  const list = [...view.cursors.values()]
    .filter((c) => c.user?.id)
    .sort((a, b) => (a.user.name || "").localeCompare(b.user.name || "") || a.conn.localeCompare(b.conn));
  const items = [];
  const here = [];
  for (const c of list) {
    const hue = String(hueOf(c.user.id));
    const name = c.user.name || "anonymous";
    let where;
    if (dc && c.doc === dc.name) {
      const head = clampIndex(text, c.head);
      const anchor = clampIndex(text, c.anchor);
      const { line, col } = lineCol(text, head);
      const selected = Math.abs(head - anchor);
      where = `line ${line}, col ${col}${selected ? ` (${selected} selected)` : ""}`;
      here.push({ c, head, hue, name });
    } else {
      where = `in “${c.doc}”`;
    }
    items.push(el("li", { class: "cursor-item", "data-conn": c.conn, style: { "--hue": hue } },
      el("span", { class: "cursor-swatch", "aria-hidden": "true" }),
      el("span", { class: "cursor-name", text: name }),
      el("span", { class: "cursor-where", text: ` — ${where}` })));
  }
  ui.cursors.replaceChildren(...items);
  ui.cursors.hidden = items.length === 0;
  drawCaretOverlay(here);
}

// The overlay: each remote caret drawn where a hidden copy of the textarea's text puts it.
const MIRRORED = ["boxSizing", "borderTopWidth", "borderRightWidth", "borderBottomWidth", "borderLeftWidth",
  "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "fontStyle", "fontVariant", "fontWeight",
  "fontStretch", "fontSize", "fontFamily", "lineHeight", "letterSpacing", "wordSpacing", "textTransform",
  "textIndent", "tabSize", "textAlign"];
let mirror = null;

function drawCaretOverlay(cursors) {
  const ta = ui.editor;
  if (cursors.length === 0 || ta.clientWidth === 0) {
    ui.cursorLayer.replaceChildren();
    return;
  }
  if (!mirror) {
    mirror = el("div", { class: "editor-mirror", "aria-hidden": "true" });
    ui.editorWrap.append(mirror);
  }
  const cs = getComputedStyle(ta);
  for (const prop of MIRRORED) mirror.style[prop] = cs[prop];
  mirror.style.boxSizing = "content-box";
  mirror.style.borderStyle = "solid";
  mirror.style.borderColor = "transparent";
  const padX = parseFloat(cs.paddingLeft) + parseFloat(cs.paddingRight);
  mirror.style.width = `${Math.max(0, ta.clientWidth - padX)}px`;
  const lineHeight = parseFloat(cs.lineHeight) || parseFloat(cs.fontSize) * 1.4;
  const value = ta.value;
  const markers = [];
  for (const { head, hue, name } of cursors) {
    mirror.textContent = value.slice(0, head);
    const mark = document.createElement("span");
    mark.textContent = value.slice(head) || ".";
    mirror.append(mark);
    // The mirror has the textarea's borders and padding: offsets land in the same box.
    const x = mark.offsetLeft - ta.scrollLeft;
    const y = mark.offsetTop - ta.scrollTop;
    const visible = y + lineHeight > ta.clientTop && y < ta.clientTop + ta.clientHeight &&
      x >= ta.clientLeft && x <= ta.clientLeft + ta.clientWidth;
    if (!visible) continue;
    markers.push(el("div", {
      class: y - ta.clientTop < lineHeight ? "remote-caret label-below" : "remote-caret",
      style: { "--hue": hue, left: `${x}px`, top: `${y}px`, height: `${lineHeight}px` },
    }, el("span", { class: "remote-caret-label", text: name })));
  }
  mirror.textContent = "";
  ui.cursorLayer.replaceChildren(...markers);
}

ui.editor.addEventListener("scroll", () => renderCursors());
if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => renderCursors()).observe(ui.editor);

function resetEditor() {
  ui.editor.value = "";
  ui.editor.disabled = true;
  ui.editor.readOnly = false;
  ui.editor.placeholder = "Join a session to edit its documents";
  ui.docSelect.replaceChildren();
  ui.docSelect.disabled = true;
  ui.docName.value = "";
  ui.docName.disabled = true;
  ui.docOpen.disabled = true;
  showFieldError(ui.docName, ui.docNameError, "");
  hideDocNotice();
  ui.docStatus.dataset.state = "idle";
  ui.docStatusText.textContent = "";
  ui.docVersion.textContent = "";
  ui.cursors.replaceChildren();
  ui.cursors.hidden = true;
  ui.cursorLayer.replaceChildren();
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

function shareUrl(session, name, doc = DEFAULT_DOC) {
  const params = new URLSearchParams({ session, name });
  if (doc && doc !== DEFAULT_DOC) params.set("doc", doc);
  return `${location.pathname}?${params}`;
}

function startSession(session, name, token, doc = DEFAULT_DOC) {
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
    sending: false,
    reporter: new PresenceReporter(client, session),
    docs: new Map(), // name → DocClient
    activeDoc: DOC_NAME.test(doc) ? doc : DEFAULT_DOC,
    selections: new Map(), // name → the textarea selection when it was last shown
    cursors: new Map(), // conn → {conn, user, doc, anchor, head}: others' cursors
    mayWrite: true,
    historyRun: 0,
    names: new Map(), // user id → the name they last had in this session's log
  };
  const current = view;
  resetEditor();
  const panelContext = {
    client,
    session,
    token,
    people: () => peopleOf(current),
    memberName: (memberId) => memberName(current, memberId),
  };
  tasksPanel.start(panelContext);
  councilPanel.start(panelContext);
  workersPanel.start(panelContext);

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
    // Until the next `joined`, document edits wait (it tells whether the one in flight landed).
    if (e.detail.state !== "live") for (const dc of current.docs.values()) dc.disconnected();
    renderDocStatus();
  });
  client.addEventListener("welcome", (e) => {
    if (view !== current) return;
    if (e.detail.user?.name) ui.userName.textContent = e.detail.user.name;
    const role = e.detail.user?.role;
    current.mayWrite = !role || role === "editor" || role === "admin";
    renderDocStatus();
  });
  client.addEventListener("joined", (e) => {
    if (view !== current || e.detail.session !== session) return;
    const frame = e.detail;
    current.members = new Map((frame.members || []).filter((u) => u && u.id).map((u) => [u.id, u]));
    current.presence = new Map((frame.presence || []).filter((p) => p && p.conn).map((p) => [p.conn, p]));
    current.cursors.clear();
    for (const entry of current.presence.values()) updateRemoteCursor(entry);
    renderPresence();
    onDocsJoined(current, frame);
    if (!current.joinedOnce) {
      current.joinedOnce = true;
      history.replaceState(null, "", shareUrl(session, name, current.activeDoc));
      current.reporter.flush();
      loadHistory(current, frame.offset);
    } else {
      // Events missed while away were replayed; councils may have moved on in ways they omit.
      councilPanel.refreshOpen();
    }
  });
  client.addEventListener("event", (e) => onEvent(e.detail));
  client.addEventListener("presence", (e) => onPresence(e.detail));
  client.addEventListener("doc", (e) => onDocFrame(e.detail));
  client.addEventListener("reset", (e) => {
    if (view !== current || e.detail.session !== session) return;
    // What was shown may not be the server's history (another epoch): start again from its log.
    current.entries.clear();
    ui.chatLog.replaceChildren();
    ui.resetBanner.hidden = false;
    tasksPanel.start(panelContext);
    councilPanel.start(panelContext);
    loadHistory(current, Infinity);
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
  tasksPanel.stop();
  councilPanel.stop();
  workersPanel.stop();
  for (const dc of old.docs.values()) dc.close();
  old.client.stop();
  clearTimeout(cursorTimer);
  cursorTimer = null;
  resetEditor();
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
  const doc = (params.get("doc") || "").trim();
  ui.sessionInput.value = session;
  ui.nameInput.value = name;
  ui.tokenInput.value = token;
  if (token) ui.tokenDetails.open = true;
  renderConnection({ state: "stopped" });

  if (session) {
    const sessionProblem = validateSession(session);
    const nameProblem = validateName(name);
    if (!sessionProblem && !nameProblem) {
      startSession(session, name, token, DOC_NAME.test(doc) ? doc : DEFAULT_DOC);
      return;
    }
    showFieldError(ui.sessionInput, ui.sessionError, sessionProblem);
    if (!sessionProblem) showFieldError(ui.nameInput, ui.nameError, nameProblem);
  }
  showJoinForm();
  (session && !validateSession(session) ? ui.nameInput : ui.sessionInput).focus();
}

init();
