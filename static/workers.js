// The workers panel: the worker agents connected to the node, with their capabilities and load,
// read from `GET /v1/workers` every few seconds while the page is visible (workers come and go
// without any session event, so there is nothing to listen to).

import { describeError, el, hueOf } from "./dom.js";
import { restJson } from "./rest.js";

const POLL_MS = 4_000;

export class WorkersPanel {
  /** @param {(kinds: Set<string>) => void} onKinds told the capabilities on offer after each poll */
  constructor(onKinds) {
    const $ = (id) => document.getElementById(id);
    this.ui = { list: $("worker-list"), empty: $("worker-empty"), count: $("worker-count"), note: $("worker-note") };
    this.onKinds = onKinds;
    this.ctx = null;
    this.timer = null;
    this.inFlight = false;
    /** worker id → the last view of it, kept after it leaves so councils can still name it. */
    this.known = new Map();
    document.addEventListener("visibilitychange", () => {
      if (this.ctx && !document.hidden) this.poll();
    });
  }

  start(ctx) {
    this.stop();
    this.ctx = ctx;
    this.ui.note.textContent = "";
    this.poll();
    this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.ctx = null;
  }

  /** A worker's display name, if it was ever listed. */
  nameOf(workerId) {
    return this.known.get(workerId)?.name || "";
  }

  async poll() {
    const ctx = this.ctx;
    if (!ctx || document.hidden || this.inFlight) return;
    this.inFlight = true;
    try {
      const workers = await restJson("/v1/workers", { token: ctx.token });
      if (this.ctx !== ctx || !Array.isArray(workers)) return;
      this.render(workers);
      this.ui.note.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      this.ui.note.dataset.kind = "";
    } catch (error) {
      if (this.ctx !== ctx) return;
      this.ui.note.textContent = `Could not load the workers: ${describeError(error)}`;
      this.ui.note.dataset.kind = "error";
    } finally {
      this.inFlight = false;
    }
  }

  render(workers) {
    const sorted = workers
      .filter((w) => w && typeof w.id === "string")
      .sort((a, b) => (a.name || "").localeCompare(b.name || "") || a.id.localeCompare(b.id));
    const kinds = new Set();
    const items = sorted.map((w) => {
      this.known.set(w.id, w);
      const caps = Array.isArray(w.capabilities) ? w.capabilities.filter((c) => typeof c === "string") : [];
      for (const c of caps) kinds.add(c);
      const capacity = Math.max(1, Number(w.capacity) || 1);
      const load = Math.max(0, Number(w.load) || 0);
      const pct = Math.min(100, Math.round((load / capacity) * 100));
      return el("li", { class: "worker", "data-worker": w.id, "data-testid": "worker-item", style: { "--hue": String(hueOf(w.id)) } },
        el("div", { class: "worker-head" },
          el("span", { class: "worker-name", text: w.name || "worker", title: `Worker ${w.id}` }),
          el("span", { class: "worker-id", text: `…${w.id.slice(-6)}`, title: w.id }),
          w.draining ? el("span", { class: "badge state-retrying", text: "draining" }) : null),
        el("ul", { class: "chips", "aria-label": "Capabilities" },
          ...caps.map((c) => el("li", { class: "chip", text: c }))),
        el("div", { class: "load" },
          el("span", { class: "load-bar", "aria-hidden": "true" }, el("span", { style: { width: `${pct}%` } })),
          el("span", { class: "load-text", text: `load ${load} of ${capacity}` })));
    });
    this.ui.list.replaceChildren(...items);
    this.ui.count.textContent = items.length ? `(${items.length})` : "";
    this.ui.empty.hidden = items.length > 0;
    this.onKinds(kinds);
  }
}
