// The tasks panel: submit a task (kind and JSON input, checked here before it is sent), and a
// live list of the session's tasks built from its `task.*` events, with cancel.
//
// The list is a fold over the event log, so it comes out the same whichever order the events are
// fed in (history over REST and live events over the socket overlap at join): each task keeps the
// offset of the event that last set its state, and an older event never overrides a newer one.

import { describeError, el, intField, prettyJson, showFieldError, timeNode } from "./dom.js";
import { restJson } from "./rest.js";

const KIND = /^[A-Za-z0-9._-]{1,128}$/;
const STATE_OF = {
  "task.submitted": "submitted",
  "task.working": "working",
  "task.retrying": "retrying",
  "task.completed": "completed",
  "task.failed": "failed",
  "task.canceled": "canceled",
};
const ACTIVE = new Set(["submitted", "working", "retrying"]);
const STATE_TEXT = {
  submitted: "queued",
  working: "working",
  retrying: "retrying",
  completed: "completed",
  failed: "failed",
  canceled: "canceled",
};
/** Bounds of task.submit (src/tasks/model.rs). */
const LIMITS = {
  priority: [0, 1000, "Priority"],
  max_attempts: [1, 100, "Max attempts"],
  timeout_s: [1, 86_400, "Timeout"],
};
/** The newest tasks shown; older ones stay counted. */
const MAX_SHOWN = 200;
/** Tasks that councils give their agent members: hidden unless asked for. */
const isCouncilKind = (kind) => kind.startsWith("council.");

export class TasksPanel {
  constructor() {
    const $ = (id) => document.getElementById(id);
    this.ui = {
      form: $("task-form"),
      kind: $("task-kind"),
      kinds: $("task-kinds"),
      input: $("task-input"),
      priority: $("task-priority"),
      attempts: $("task-attempts"),
      timeout: $("task-timeout"),
      submit: $("task-submit"),
      error: $("task-error"),
      status: $("task-status"),
      showCouncil: $("task-show-council"),
      list: $("task-list"),
      empty: $("task-empty"),
      count: $("task-count"),
      more: $("task-more"),
    };
    this.ctx = null;
    this.tasks = new Map();
    this.views = new Map();
    this.flushQueued = false;
    this.sending = false;

    this.ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    for (const input of [this.ui.kind, this.ui.input, this.ui.priority, this.ui.attempts, this.ui.timeout]) {
      input.addEventListener("input", () => {
        if (input.getAttribute("aria-invalid")) this.setError(null, "");
      });
    }
    this.ui.showCouncil.addEventListener("change", () => this.renderAll());
    this.ui.list.addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action='cancel']");
      if (button) this.cancel(button.closest("li").dataset.task);
    });
    this.setEnabled(false);
  }

  /** Takes over the panel for a newly joined session. */
  start(ctx) {
    this.ctx = ctx;
    this.tasks.clear();
    this.views.clear();
    this.ui.list.replaceChildren();
    this.setError(null, "");
    this.ui.status.textContent = "";
    this.setEnabled(true);
    this.place();
  }

  stop() {
    this.ctx = null;
    this.setEnabled(false);
  }

  setEnabled(on) {
    for (const node of this.ui.form.elements) node.disabled = !on;
  }

  /** The capabilities connected workers declare, offered as kinds. */
  setKinds(kinds) {
    const current = [...this.ui.kinds.options].map((o) => o.value).join("\n");
    const next = [...kinds].filter((k) => !isCouncilKind(k)).sort();
    if (current === next.join("\n")) return;
    this.ui.kinds.replaceChildren(...next.map((k) => el("option", { value: k })));
  }

  // ---- the fold over task events -----------------------------------------------------------

  onEvent(event) {
    const data = event.data;
    if (!data || typeof data.task !== "string") return;
    const task = this.ensure(data.task, typeof data.kind === "string" ? data.kind : "task");
    const offset = typeof event.offset === "number" ? event.offset : 0;
    if (typeof data.attempt === "number") task.attempt = Math.max(task.attempt, data.attempt);
    if (event.kind === "task.submitted") {
      task.order = offset;
      task.at = event.at;
      task.by = event.actor?.name || "";
    }
    if (event.kind === "task.progress") {
      if (offset > task.progressOffset) {
        task.progressOffset = offset;
        task.progress = data.progress ?? null;
      }
    } else if (STATE_OF[event.kind] && offset > task.stateOffset) {
      task.stateOffset = offset;
      task.state = STATE_OF[event.kind];
      if ("output" in data) task.output = data.output;
      if (typeof data.error === "string") task.error = data.error;
      task.notBefore = typeof data.not_before === "string" ? data.not_before : null;
    }
    this.touch(task);
  }

  ensure(id, kind) {
    let task = this.tasks.get(id);
    if (!task) {
      task = {
        id, kind, state: "submitted", attempt: 0, order: Number.MAX_SAFE_INTEGER, at: null, by: "",
        stateOffset: -1, progressOffset: -1, progress: undefined, output: undefined, error: null,
        notBefore: null, input: undefined, maxAttempts: null, cancelError: "", canceling: false, stale: true,
      };
      this.tasks.set(id, task);
    }
    return task;
  }

  touch(task) {
    task.stale = true;
    if (this.flushQueued) return;
    this.flushQueued = true;
    // One render for a whole batch of events (a page of history arrives in one go).
    queueMicrotask(() => {
      this.flushQueued = false;
      if (this.ctx) this.place();
    });
  }

  // ---- rendering ---------------------------------------------------------------------------

  visible(task) {
    return this.ui.showCouncil.checked || !isCouncilKind(task.kind);
  }

  sorted() {
    return [...this.tasks.values()].filter((t) => this.visible(t)).sort((a, b) => b.order - a.order
      || (a.id < b.id ? 1 : -1));
  }

  renderAll() {
    for (const task of this.tasks.values()) task.stale = true;
    this.place();
  }

  /**
   * Shows the newest visible tasks in order, rendering only rows that changed and moving only
   * rows that are out of place.
   */
  place() {
    const list = this.ui.list;
    const visible = this.sorted();
    const shown = visible.slice(0, MAX_SHOWN);
    for (const task of shown) {
      if (task.stale || !this.views.has(task.id)) this.renderTask(task);
    }
    const wanted = shown.map((t) => this.views.get(t.id).li);
    const keep = new Set(wanted);
    for (const child of [...list.children]) if (!keep.has(child)) child.remove();
    wanted.forEach((li, i) => {
      if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
    });
    const active = visible.filter((t) => ACTIVE.has(t.state)).length;
    this.ui.count.textContent = visible.length ? `(${active ? `${active} active, ` : ""}${visible.length})` : "";
    this.ui.empty.hidden = visible.length > 0;
    this.ui.more.hidden = visible.length <= MAX_SHOWN;
    this.ui.more.textContent = `Showing the newest ${MAX_SHOWN} of ${visible.length} tasks.`;
  }

  view(task) {
    let view = this.views.get(task.id);
    if (view) return view;
    const li = el("li", { class: "task", "data-task": task.id, "data-testid": "task-item" });
    view = {
      li,
      kind: el("span", { class: "task-kind" }),
      badge: el("span", { class: "badge", "data-testid": "task-state" }),
      meta: el("p", { class: "task-meta" }),
      progress: el("p", { class: "task-progress", "data-testid": "task-progress" }),
      output: el("pre", { class: "task-output", "data-testid": "task-output", tabindex: "0" }),
      outputLabel: el("p", { class: "task-label", text: "Output" }),
      error: el("p", { class: "task-error", "data-testid": "task-error-text" }),
      inputBox: el("details", { class: "task-input" }, el("summary", { text: "Input" })),
      inputPre: el("pre", { class: "task-output" }),
      cancel: el("button", { type: "button", class: "btn btn-small btn-danger", "data-action": "cancel" }),
    };
    view.inputBox.append(view.inputPre);
    view.inputBox.addEventListener("toggle", () => {
      if (view.inputBox.open) this.showInput(task, view);
    });
    li.append(el("div", { class: "task-head" }, view.kind, view.badge), view.meta, view.progress,
      view.outputLabel, view.output, view.error, el("div", { class: "task-foot" }, view.inputBox, view.cancel));
    this.views.set(task.id, view);
    return view;
  }

  renderTask(task) {
    task.stale = false;
    const v = this.view(task);
    v.li.dataset.state = task.state;
    v.kind.textContent = task.kind;
    v.badge.textContent = STATE_TEXT[task.state] || task.state;
    v.badge.className = `badge state-${task.state}`;
    const meta = [];
    if (task.attempt > 0) meta.push(task.maxAttempts ? `attempt ${task.attempt} of ${task.maxAttempts}` : `attempt ${task.attempt}`);
    if (task.state === "retrying" && task.notBefore) {
      meta.push(`next try ${new Date(task.notBefore).toLocaleTimeString()}`);
    }
    if (task.by) meta.push(`by ${task.by}`);
    v.meta.replaceChildren(meta.join(" · "));
    if (task.at) v.meta.append(meta.length ? " · " : "", timeNode(task.at, "task-time"));
    v.meta.title = task.id;

    const showProgress = task.progress !== undefined && ACTIVE.has(task.state);
    v.progress.hidden = !showProgress;
    v.progress.textContent = showProgress ? `Progress: ${progressText(task.progress)}` : "";

    const done = task.state === "completed" && task.output !== undefined;
    v.outputLabel.hidden = !done;
    v.output.hidden = !done;
    v.output.textContent = done ? prettyJson(task.output) : "";

    const errorText = task.cancelError || ((task.state === "failed" || task.state === "retrying") && task.error) || "";
    v.error.hidden = !errorText;
    v.error.textContent = errorText
      ? (task.cancelError ? task.cancelError : `${task.state === "retrying" ? "Last error" : "Error"}: ${errorText}`)
      : "";

    const cancellable = ACTIVE.has(task.state);
    v.cancel.hidden = !cancellable;
    v.cancel.disabled = task.canceling;
    v.cancel.textContent = task.canceling ? "Canceling…" : "Cancel";
    v.cancel.setAttribute("aria-label", `Cancel ${task.kind} task`);
    if (v.inputBox.open && task.input !== undefined) v.inputPre.textContent = prettyJson(task.input);
  }

  /** Shows a task's input: known for tasks sent from here, read over REST for the others. */
  async showInput(task, view) {
    if (task.input !== undefined) {
      view.inputPre.textContent = prettyJson(task.input);
      return;
    }
    const ctx = this.ctx;
    view.inputPre.textContent = "Loading…";
    try {
      const record = await restJson(`/v1/tasks/${encodeURIComponent(task.id)}`, { token: ctx.token });
      if (this.ctx !== ctx) return;
      task.input = record.input;
      if (typeof record.max_attempts === "number") task.maxAttempts = record.max_attempts;
      this.renderTask(task);
      view.inputPre.textContent = prettyJson(task.input);
    } catch (error) {
      if (this.ctx === ctx) view.inputPre.textContent = `Could not load the input: ${describeError(error)}`;
    }
  }

  // ---- submitting and canceling ------------------------------------------------------------

  setError(input, message) {
    for (const node of [this.ui.kind, this.ui.input, this.ui.priority, this.ui.attempts, this.ui.timeout]) {
      if (node !== input) node.removeAttribute("aria-invalid");
    }
    if (input) showFieldError(input, this.ui.error, message);
    else {
      this.ui.error.textContent = message;
      this.ui.error.hidden = !message;
    }
  }

  /** The form as a task.submit frame, or the first problem with it (and the field to fix). */
  read() {
    const kind = this.ui.kind.value.trim();
    if (!kind) return { field: this.ui.kind, problem: "Enter the kind of task, such as one a worker lists." };
    if (!KIND.test(kind)) {
      return { field: this.ui.kind, problem: "A kind uses only letters, digits, “.”, “_” and “-”, up to 128 characters." };
    }
    const frame = { kind };
    const raw = this.ui.input.value.trim();
    if (raw) {
      try {
        frame.input = JSON.parse(raw);
      } catch (err) {
        return { field: this.ui.input, problem: `The input is not valid JSON: ${err.message}` };
      }
    }
    for (const [key, field] of [["priority", this.ui.priority], ["max_attempts", this.ui.attempts],
      ["timeout_s", this.ui.timeout]]) {
      const [min, max, label] = LIMITS[key];
      const value = intField(field);
      if (value === null) continue;
      if (!Number.isSafeInteger(value) || value < min || value > max) {
        return { field, problem: `${label} must be a whole number from ${min} to ${max}.` };
      }
      frame[key] = value;
    }
    return { frame };
  }

  async submit() {
    const ctx = this.ctx;
    if (!ctx || this.sending) return;
    const { frame, field, problem } = this.read();
    if (problem) {
      this.setError(field, problem);
      if (field.closest("details")) field.closest("details").open = true;
      field.focus();
      return;
    }
    this.setError(null, "");
    this.sending = true;
    this.ui.submit.disabled = true;
    this.ui.status.textContent = "Submitting…";
    try {
      const ack = await ctx.client.request({ type: "task.submit", session: ctx.session, ...frame });
      if (this.ctx !== ctx) return;
      if (typeof ack.task === "string") {
        const task = this.ensure(ack.task, frame.kind);
        task.input = frame.input ?? null;
        task.maxAttempts = frame.max_attempts ?? 3;
        this.touch(task);
      }
      this.ui.status.textContent = `Submitted a ${frame.kind} task.`;
    } catch (error) {
      if (this.ctx !== ctx) return;
      this.ui.status.textContent = "";
      this.setError(null, `Not submitted: ${describeError(error)}`);
    } finally {
      this.sending = false;
      if (this.ctx === ctx) this.ui.submit.disabled = false;
    }
  }

  async cancel(id) {
    const ctx = this.ctx;
    const task = this.tasks.get(id);
    if (!ctx || !task || task.canceling) return;
    task.canceling = true;
    task.cancelError = "";
    this.renderTask(task);
    try {
      await ctx.client.request({ type: "task.cancel", task: id });
    } catch (error) {
      if (this.ctx === ctx) task.cancelError = `Could not cancel: ${describeError(error)}`;
    } finally {
      if (this.ctx === ctx) {
        task.canceling = false;
        this.renderTask(task);
      }
    }
  }
}

/** A worker's progress data, short: a number or percentage as is, anything else as JSON. */
function progressText(data) {
  if (typeof data === "number") return String(data);
  if (data && typeof data === "object") {
    const pct = typeof data.percent === "number" ? data.percent : null;
    const message = typeof data.message === "string" ? data.message : "";
    if (pct !== null || message) return [pct !== null ? `${pct}%` : "", message].filter(Boolean).join(" — ");
  }
  const text = JSON.stringify(data);
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}
