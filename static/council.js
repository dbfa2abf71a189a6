// The council panel: open a council (question, members, strategy, rounds, timeout, quorum), follow
// each one's phases from the session's `council.*` events, see the labeled proposals and reviews,
// the decision with its dissent, and answer with a ballot when you are a member.
//
// Events carry the phases and the labeled answers; `GET /v1/councils/{id}` adds what events do
// not (the members, the ballots so far) and is read after each event of a council still
// deliberating. Identities stay hidden while a council deliberates: ballots are only counted until
// the decision publishes the label map. A ballot form is built once per phase and round, so a
// re-render never eats what the person is typing.

import { describeError, el, intField, showFieldError, timeNode } from "./dom.js";
import { restJson } from "./rest.js";

const NAME = /^[A-Za-z0-9._-]{1,128}$/;
const STRATEGIES = new Set(["majority", "borda", "confidence", "chair"]);
const PHASE_TEXT = {
  propose: "Proposals",
  review: "Reviews",
  revise: "Revision",
  synthesize: "Synthesis",
  done: "Done",
};
const STATE_TEXT = { deliberating: "deliberating", decided: "decided", no_quorum: "no quorum", canceled: "canceled" };
/** The tie-break criteria (src/council/strategy.rs), as a sentence ends them. */
const TIE_BREAK = {
  borda: "Borda points",
  confidence: "confidence weight",
  votes: "votes",
  lexicographic: "the alphabetically first answer",
};
/** How often, and how far apart, to read a council again whose saved view lags its events. */
const LAG_READS = 20;
const LAG_READ_MS = 150;
/** Bounds of council.open (src/council/model.rs). */
const LIMITS = { rounds: [1, 10], phase_timeout_s: [1, 3600], quorum: [1, 64], count: [0, 64] };

export class CouncilPanel {
  constructor() {
    const $ = (id) => document.getElementById(id);
    this.ui = {
      details: $("council-open"),
      form: $("council-form"),
      question: $("council-question"),
      capability: $("council-capability"),
      count: $("council-count"),
      people: $("council-people"),
      strategy: $("council-strategy"),
      rounds: $("council-rounds"),
      timeout: $("council-timeout"),
      quorum: $("council-quorum"),
      submit: $("council-submit"),
      error: $("council-error"),
      status: $("council-status"),
      list: $("council-list"),
      empty: $("council-empty"),
      count_: $("council-total"),
      announce: $("council-announce"),
    };
    this.ctx = null;
    this.councils = new Map();
    this.views = new Map();
    this.dirty = new Set();
    this.flushQueued = false;
    this.sending = false;
    this.ticker = null;

    this.ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.open();
    });
    this.ui.form.addEventListener("input", (e) => {
      if (e.target.getAttribute?.("aria-invalid")) this.setError(null, "");
    });
    this.setEnabled(false);
  }

  start(ctx) {
    this.ctx = ctx;
    this.councils.clear();
    this.views.clear();
    this.dirty.clear();
    this.ui.list.replaceChildren();
    this.setError(null, "");
    this.ui.status.textContent = "";
    this.setEnabled(true);
    this.renderPeople();
    this.renderCount();
    clearInterval(this.ticker);
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  stop() {
    this.ctx = null;
    clearInterval(this.ticker);
    this.ticker = null;
    this.setEnabled(false);
  }

  setEnabled(on) {
    for (const node of this.ui.form.elements) node.disabled = !on;
  }

  // ---- the fold over council events --------------------------------------------------------

  ensure(id) {
    let c = this.councils.get(id);
    if (!c) {
      c = {
        id, question: "", strategy: "", rounds: 1, quorum: 1, timeout: null, memberCount: null,
        openedBy: "", at: null, order: Number.MAX_SAFE_INTEGER,
        state: "deliberating", phase: "propose", round: 1, phaseOffset: -1, deadline: null, awaiting: null,
        proposals: null, shown: null, decision: null, labelMap: null, ballots: [], members: null,
        ballotError: "", sending: false, fetching: false, refetch: false,
        rankDraft: null, yourLabel: null, viewPhase: "", lagReads: 0,
      };
      this.councils.set(id, c);
    }
    return c;
  }

  onEvent(event) {
    const data = event.data;
    if (!data || typeof data.council !== "string") return;
    const c = this.ensure(data.council);
    const offset = typeof event.offset === "number" ? event.offset : 0;
    if (event.kind === "council.opened") {
      c.order = offset;
      c.at = event.at;
      if (typeof data.opened_by === "string") c.openedBy = data.opened_by;
      this.takeSpec(c, data);
      if (typeof data.members === "number") c.memberCount = data.members;
    } else if (event.kind === "council.phase" && offset > c.phaseOffset && c.state === "deliberating") {
      c.phaseOffset = offset;
      c.phase = data.phase;
      c.round = data.round ?? c.round;
      c.deadline = data.deadline || null;
      c.awaiting = typeof data.awaiting === "number" ? data.awaiting : null;
      const shown = data.proposals && typeof data.proposals === "object" ? data.proposals : null;
      c.shown = shown;
      if (shown && data.phase === "review") c.proposals = shown;
      if (!event.replayed) this.say(`Council “${short(c.question)}”: ${PHASE_TEXT[c.phase] || c.phase}, round ${c.round}.`);
    } else if (event.kind === "council.decided") {
      this.takeSpec(c, data);
      this.takeDecision(c, data.decision, data.label_map, data.ballots);
      if (data.chair) c.chair = data.chair;
      if (!event.replayed) {
        const d = c.decision;
        this.say(d?.answer ? `Council decided: ${d.answer}` : `Council ended without a decision.`);
      }
    }
    if (c.state === "deliberating" && !event.replayed) this.refresh(c);
    this.touch(c);
  }

  /** After the history is in, or a rejoin: read the councils still deliberating (members, ballots). */
  refreshOpen() {
    for (const c of this.councils.values()) if (c.state === "deliberating") this.refresh(c);
  }

  takeSpec(c, data) {
    if (typeof data.question === "string") c.question = data.question;
    if (typeof data.strategy === "string") c.strategy = data.strategy;
    if (typeof data.rounds === "number") c.rounds = data.rounds;
    if (typeof data.quorum === "number") c.quorum = data.quorum;
    if (typeof data.phase_timeout_s === "number") c.timeout = data.phase_timeout_s;
  }

  takeDecision(c, decision, labelMap, ballots) {
    if (!decision || typeof decision !== "object") return;
    c.decision = decision;
    c.state = decision.outcome || "decided";
    c.phase = "done";
    c.deadline = null;
    if (labelMap && typeof labelMap === "object") c.labelMap = labelMap;
    if (Array.isArray(ballots)) c.ballots = ballots;
  }

  /** Reads the council's full view; one read at a time, and one more if events came meanwhile. */
  async refresh(c) {
    const ctx = this.ctx;
    if (!ctx) return;
    if (c.fetching) {
      c.refetch = true;
      return;
    }
    c.fetching = true;
    try {
      const view = await restJson(`/v1/councils/${encodeURIComponent(c.id)}`, { token: ctx.token });
      if (this.ctx !== ctx) return;
      this.takeSpec(c, view);
      if (Array.isArray(view.members)) c.members = view.members;
      // A read that started before `council.decided` must not undo the audit it carried.
      if (Array.isArray(view.ballots) && c.state === "deliberating") c.ballots = view.ballots;
      if (typeof view.your_label === "string") c.yourLabel = view.your_label;
      c.viewPhase = `${view.phase}:${view.round}`;
      if (view.state !== "deliberating" && !c.decision) this.takeDecision(c, view.decision, view.label_map, view.ballots);
      // The council saves its state a moment after it announces a phase: read again until the
      // view has caught up with the events.
      const behind = c.state === "deliberating" && c.phaseOffset >= 0 && c.viewPhase !== `${c.phase}:${c.round}`;
      c.lagReads = behind ? c.lagReads + 1 : 0;
      if (behind && c.lagReads <= LAG_READS) setTimeout(() => this.ctx === ctx && this.refresh(c), LAG_READ_MS);
      this.touch(c);
    } catch {
      /* the events still show the phases; the next event reads again */
    } finally {
      c.fetching = false;
      if (c.refetch && this.ctx === ctx) {
        c.refetch = false;
        this.refresh(c);
      }
    }
  }

  touch(c) {
    this.dirty.add(c.id);
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      if (!this.ctx) return;
      const ids = this.dirty;
      this.dirty = new Set();
      for (const id of ids) this.renderCouncil(this.councils.get(id));
      this.place();
    });
  }

  say(text) {
    this.ui.announce.textContent = text;
  }

  // ---- who is who ----------------------------------------------------------------------------

  meId() {
    const id = this.ctx?.client.user?.id;
    return id ? `user:${id}` : null;
  }

  isMember(c) {
    const me = this.meId();
    return !!me && Array.isArray(c.members) && c.members.some((m) => m.id === me);
  }

  memberName(memberId) {
    if (typeof memberId !== "string") return "someone";
    if (memberId === this.meId()) return "you";
    const known = this.ctx?.memberName(memberId);
    if (known) return known;
    const [kind, id = ""] = memberId.split(/:(.*)/s);
    return `${kind === "worker" ? "agent" : "person"} …${id.slice(-6)}`;
  }

  /** The label a member's answer went under, once the label map is public. */
  labelOf(c, memberId) {
    if (!c.labelMap) return null;
    for (const [label, member] of Object.entries(c.labelMap)) if (member === memberId) return label;
    return null;
  }

  myBallots(c) {
    const me = this.meId();
    return c.ballots.filter((b) => b.member === me);
  }

  /** What the person may send now: "propose", "revise", "review", or null. */
  ballotPhase(c) {
    if (c.state !== "deliberating" || !this.isMember(c)) return null;
    if (!["propose", "revise", "review"].includes(c.phase)) return null;
    // A ranking must leave out the person's own label, which a read in this phase tells.
    if (c.phase === "review" && c.viewPhase !== `review:${c.round}`) return null;
    const mine = this.myBallots(c);
    if (mine.some((b) => b.phase === c.phase && b.round === c.round && (b.valid || b.abstained))) return null;
    // Only members with a valid proposal revise.
    if (c.phase === "revise" && !mine.some((b) => (b.phase === "propose" || b.phase === "revise") && b.valid)) return null;
    return c.phase;
  }

  // ---- rendering -----------------------------------------------------------------------------

  place() {
    const sorted = [...this.councils.values()].sort((a, b) => b.order - a.order || (a.id < b.id ? 1 : -1));
    const list = this.ui.list;
    sorted.forEach((c, i) => {
      const li = this.views.get(c.id)?.li;
      if (li && list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
    });
    this.renderCount();
  }

  renderCount() {
    const n = this.councils.size;
    const live = [...this.councils.values()].filter((c) => c.state === "deliberating").length;
    this.ui.count_.textContent = n ? `(${live ? `${live} open, ` : ""}${n})` : "";
    this.ui.empty.hidden = n > 0;
  }

  view(c) {
    let v = this.views.get(c.id);
    if (v) return v;
    const headingId = `council-q-${c.id}`;
    v = {
      li: el("li", { class: "council", "data-council": c.id, "data-testid": "council-item" }),
      question: el("h3", { class: "council-question", id: headingId }),
      badge: el("span", { class: "badge", "data-testid": "council-state" }),
      meta: el("p", { class: "council-meta" }),
      phases: el("ol", { class: "phases", "aria-label": "Phases" }),
      status: el("p", { class: "council-status", "data-testid": "council-phase" }),
      proposals: el("div", { class: "council-block" }),
      reviews: el("div", { class: "council-block" }),
      decision: el("div", { class: "decision", "data-testid": "council-decision" }),
      ballot: el("div", { class: "ballot-slot" }),
      ballotKey: "",
    };
    v.li.append(el("article", { "aria-labelledby": headingId },
      el("div", { class: "council-head" }, v.question, v.badge), v.meta, v.phases, v.status, v.decision,
      v.proposals, v.reviews, v.ballot));
    this.views.set(c.id, v);
    return v;
  }

  renderCouncil(c) {
    if (!c) return;
    const v = this.view(c);
    v.li.dataset.state = c.state;
    v.li.dataset.phase = c.phase;
    v.question.textContent = c.question || "A council";
    v.badge.textContent = STATE_TEXT[c.state] || c.state;
    v.badge.className = `badge council-${c.state}`;
    const members = c.members ? c.members.length : c.memberCount;
    const meta = [
      c.strategy,
      `${c.rounds} round${c.rounds === 1 ? "" : "s"}`,
      `quorum ${c.quorum}`,
      c.timeout ? `${c.timeout} s a phase` : "",
      members !== null && members !== undefined ? `${members} member${members === 1 ? "" : "s"}` : "",
      c.openedBy ? `opened by ${this.memberName(`user:${c.openedBy}`)}` : "",
    ].filter(Boolean);
    v.meta.replaceChildren(meta.join(" · "));
    if (c.at) v.meta.append(" · ", timeNode(c.at, "task-time"));
    this.renderPhases(c, v);
    this.renderStatus(c, v);
    this.renderDecision(c, v);
    this.renderProposals(c, v);
    this.renderReviews(c, v);
    this.renderBallot(c, v);
  }

  renderPhases(c, v) {
    const steps = ["propose", "review"];
    if (c.rounds > 1) steps.push("revise");
    if (c.strategy === "chair") steps.push("synthesize");
    steps.push("done");
    const at = steps.indexOf(c.phase);
    v.phases.replaceChildren(...steps.map((step, i) => {
      const state = c.phase === "done" || i < at ? "past" : i === at ? "current" : "future";
      const item = el("li", { class: `phase phase-${state}`, "data-phase": step,
        text: step === "done" ? "Decision" : PHASE_TEXT[step] });
      if (state === "current") item.setAttribute("aria-current", "step");
      return item;
    }));
  }

  renderStatus(c, v) {
    if (c.state !== "deliberating") {
      v.status.hidden = true;
      return;
    }
    v.status.hidden = false;
    const parts = [`${PHASE_TEXT[c.phase] || c.phase}${c.phase === "revise" ? `, round ${c.round}` : ""}`];
    if (c.awaiting !== null) {
      const inNow = c.ballots.filter((b) => b.phase === c.phase && b.round === c.round && b.valid).length;
      parts.push(`${Math.min(inNow, c.awaiting)} of ${c.awaiting} in`);
    }
    if (c.deadline) {
      const left = Math.max(0, Math.ceil((Date.parse(c.deadline) - Date.now()) / 1000));
      parts.push(`${left} s left`);
    }
    v.status.textContent = parts.join(" · ");
  }

  tick() {
    for (const c of this.councils.values()) {
      if (c.state === "deliberating" && c.deadline) this.renderStatus(c, this.view(c));
    }
  }

  /** Each labeled proposal (answers only while the council deliberates; who and how sure after). */
  renderProposals(c, v) {
    const proposals = c.proposals || c.shown;
    if (!proposals || Object.keys(proposals).length === 0) {
      v.proposals.replaceChildren();
      v.proposals.hidden = true;
      return;
    }
    v.proposals.hidden = false;
    const finals = this.finalAnswers(c);
    const over = c.state !== "deliberating" && c.labelMap;
    const rows = Object.keys(proposals).sort().map((label) => {
      const member = over ? c.labelMap[label] : null;
      const first = this.ballotOf(c, member, "propose", 1);
      const final = member ? finals.get(member) : null;
      const details = [];
      if (typeof first?.raw?.confidence === "number") details.push(`confidence ${first.raw.confidence}`);
      if (member) details.push(this.memberName(member));
      return el("li", { class: "proposal", "data-label": label },
        el("span", { class: "label-chip", text: label, "aria-label": `Proposal ${label}` }),
        el("span", { class: "proposal-body" },
          el("span", { class: "proposal-answer", text: String(proposals[label]) }),
          final && final !== proposals[label] ? el("span", { class: "proposal-final", text: `revised to: ${final}` }) : null,
          details.length ? el("span", { class: "proposal-who", text: details.join(" · ") }) : null));
    });
    v.proposals.replaceChildren(el("h4", { text: "Proposals" }), el("ul", { class: "proposals" }, ...rows));
  }

  /** Each member's last valid answer (round 1 proposal or a revision). */
  finalAnswers(c) {
    const finals = new Map();
    for (const b of c.ballots) {
      if (b.valid && (b.phase === "propose" || b.phase === "revise") && typeof b.raw?.answer === "string") {
        finals.set(b.member, b.raw.answer);
      }
    }
    return finals;
  }

  ballotOf(c, member, phase, round) {
    if (!member) return null;
    return c.ballots.find((b) => b.member === member && b.phase === phase && b.round === round && b.valid) || null;
  }

  renderReviews(c, v) {
    const reviews = c.ballots.filter((b) => b.phase === "review" && b.valid && Array.isArray(b.raw?.ranking));
    if (c.state === "deliberating" || reviews.length === 0) {
      v.reviews.replaceChildren();
      v.reviews.hidden = true;
      return;
    }
    v.reviews.hidden = false;
    const rows = reviews.map((b) => {
      const label = this.labelOf(c, b.member);
      const who = label ? `Reviewer ${label}` : `Reviewer ${this.memberName(b.member)}`;
      return el("li", { class: "review" },
        el("span", { class: "review-who", text: who }),
        el("span", { class: "review-ranking", text: b.raw.ranking.join(" › "), "aria-label": `ranked ${b.raw.ranking.join(", then ")}` }),
        typeof b.raw.critique === "string" && b.raw.critique ? el("q", { class: "review-critique", text: b.raw.critique }) : null);
    });
    v.reviews.replaceChildren(el("h4", { text: "Reviews" }), el("ul", { class: "reviews" }, ...rows));
  }

  renderDecision(c, v) {
    const d = c.decision;
    if (!d) {
      v.decision.hidden = true;
      v.decision.replaceChildren();
      return;
    }
    v.decision.hidden = false;
    v.decision.dataset.outcome = d.outcome || c.state;
    const items = [];
    if (d.answer !== undefined && d.answer !== null) {
      items.push(el("p", { class: "decision-answer" }, "Decision: ", el("strong", { "data-testid": "council-answer", text: String(d.answer) })));
      const how = [`by ${c.strategy || "the strategy"}`];
      if (d.tie_break) how.push(`tie broken by ${TIE_BREAK[d.tie_break] || d.tie_break}`);
      if (c.chair) how.push(`synthesized by ${this.named(c, c.chair)}`);
      items.push(el("p", { class: "decision-how", text: how.join("; ") }));
    } else {
      items.push(el("p", { class: "decision-answer", text: `No decision: ${d.reason || STATE_TEXT[c.state] || c.state}` }));
    }
    const scores = Object.entries(d.scores || {}).sort((a, b) => b[1] - a[1]);
    if (scores.length) {
      items.push(el("p", { class: "decision-line" }, el("span", { class: "decision-key", text: "Scores " }),
        scores.map(([answer, score]) => `${answer} ${Number.isInteger(score) ? score : score.toFixed(2)}`).join(" · ")));
    }
    const dissent = Array.isArray(d.dissent) ? d.dissent : [];
    items.push(el("p", { class: "decision-line", "data-testid": "council-dissent" },
      el("span", { class: "decision-key", text: "Dissent " }),
      dissent.length ? dissent.map((m) => this.named(c, m)).join(", ") : "none"));
    const abstained = Array.isArray(d.abstained) ? d.abstained : [];
    if (abstained.length) {
      items.push(el("p", { class: "decision-line" }, el("span", { class: "decision-key", text: "Abstained " }),
        abstained.map((m) => this.named(c, m)).join(", ")));
    }
    v.decision.replaceChildren(...items);
  }

  /** A member as the decision names them: their label and who they are, now that it is over. */
  named(c, member) {
    const label = this.labelOf(c, member);
    const name = this.memberName(member);
    const final = this.finalAnswers(c).get(member);
    return `${label ? `${label} (${name})` : name}${final ? ` — “${final}”` : ""}`;
  }

  // ---- ballots -------------------------------------------------------------------------------

  renderBallot(c, v) {
    const phase = this.ballotPhase(c);
    const key = phase ? `${phase}:${c.round}:${JSON.stringify(c.shown || {})}` : "";
    if (key !== v.ballotKey) {
      v.ballotKey = key;
      c.rankDraft = null;
      c.ballotError = "";
      v.ballot.replaceChildren(phase ? this.ballotForm(c, phase) : "");
    }
    const form = v.ballot.querySelector("form");
    if (form) {
      const error = form.querySelector(".field-error");
      error.textContent = c.ballotError;
      error.hidden = !c.ballotError;
      form.querySelector("button[type=submit]").disabled = c.sending;
    }
  }

  ballotForm(c, phase) {
    const id = (part) => `ballot-${c.id}-${part}`;
    const error = el("p", { class: "field-error", id: id("error"), role: "alert", hidden: true });
    const form = el("form", { class: "ballot", "data-testid": "ballot", "data-phase": phase, novalidate: true,
      "aria-label": "Your ballot" });
    if (phase === "review") {
      const { labels, sure } = this.reviewLabels(c);
      form.append(el("h4", { text: "Your ballot: rank the others’ proposals" }),
        el("p", { class: "hint", text: "Best first: move a proposal with its arrows. Untick one to leave it out." }));
      if (!sure) {
        form.append(el("p", { class: "hint hint-strong", text: "Your answer is under more than one label and the "
          + "server did not say which is yours: untick yours. (A ranking with it is refused, naming it.)" }));
      }
      c.rankDraft = labels;
      const left = new Set();
      const list = el("ol", { class: "rank-list", "data-testid": "ballot-ranking" });
      const draw = (focusLabel, dir) => {
        list.replaceChildren(...c.rankDraft.map((label, i) => el("li", { class: "rank-item", "data-label": label },
          el("label", { class: "rank-pick" },
            el("input", { type: "checkbox", checked: !left.has(label), "data-label": label }),
            el("span", { class: "label-chip", text: label }),
            el("span", { class: "rank-answer", text: String(c.shown?.[label] ?? "") })),
          el("span", { class: "rank-buttons" },
            el("button", { type: "button", class: "btn btn-small", "data-move": "-1", "aria-label": `Move ${label} up`,
              disabled: i === 0, text: "↑" }),
            el("button", { type: "button", class: "btn btn-small", "data-move": "1", "aria-label": `Move ${label} down`,
              disabled: i === c.rankDraft.length - 1, text: "↓" })))));
        if (focusLabel) {
          const row = list.querySelector(`[data-label="${CSS.escape(focusLabel)}"]`);
          const button = row?.querySelector(`[data-move="${dir}"]:not([disabled])`) || row?.querySelector("button:not([disabled])");
          button?.focus();
        }
      };
      list.addEventListener("change", (e) => {
        const box = e.target.closest("input[type=checkbox]");
        if (!box) return;
        if (box.checked) left.delete(box.dataset.label);
        else left.add(box.dataset.label);
      });
      list.addEventListener("click", (e) => {
        const button = e.target.closest("button[data-move]");
        if (!button) return;
        const label = button.closest("li").dataset.label;
        const from = c.rankDraft.indexOf(label);
        const to = from + Number(button.dataset.move);
        if (to < 0 || to >= c.rankDraft.length) return;
        const next = [...c.rankDraft];
        [next[from], next[to]] = [next[to], next[from]];
        c.rankDraft = next;
        draw(label, button.dataset.move);
      });
      draw();
      const critique = el("textarea", { id: id("critique"), rows: "2", maxlength: "4000" });
      form.append(list, el("div", { class: "field" }, el("label", { for: id("critique"), text: "Critique (optional)" }), critique));
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const ranking = c.rankDraft.filter((label) => !left.has(label));
        if (ranking.length === 0) return this.ballotProblem(c, list.querySelector("input") || critique, "Rank at least one proposal.");
        const ballot = { ranking };
        if (critique.value.trim()) ballot.critique = critique.value.trim();
        this.cast(c, "review", ballot);
      });
    } else {
      const others = phase === "revise" && c.shown ? Object.entries(c.shown) : [];
      form.append(el("h4", { text: phase === "revise" ? `Your ballot: revise your answer (round ${c.round})` : "Your ballot: your answer" }));
      if (others.length) {
        form.append(el("p", { class: "hint", text: "The current answers:" }),
          el("ul", { class: "proposals" }, ...others.sort().map(([label, answer]) => el("li", { class: "proposal" },
            el("span", { class: "label-chip", text: label }), el("span", { class: "proposal-answer", text: String(answer) })))));
      }
      const answer = el("textarea", { id: id("answer"), rows: "2", required: true, "data-testid": "ballot-answer",
        "aria-describedby": id("error") });
      const previous = this.finalAnswers(c).get(this.meId());
      if (phase === "revise" && previous) answer.value = previous;
      const confidence = el("input", { id: id("confidence"), type: "number", min: "0", max: "1", step: "0.05",
        inputmode: "decimal", "data-testid": "ballot-confidence", "aria-describedby": id("conf-hint") });
      form.append(
        el("div", { class: "field" }, el("label", { for: id("answer"), text: "Answer" }), answer),
        el("div", { class: "field field-inline" }, el("label", { for: id("confidence"), text: "Confidence" }), confidence,
          el("span", { class: "hint", id: id("conf-hint"), text: "0 to 1, optional" })));
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const text = answer.value.trim();
        if (!text) return this.ballotProblem(c, answer, "Write your answer first.");
        const ballot = { answer: text };
        const raw = confidence.value.trim();
        if (raw) {
          const value = Number(raw);
          if (!Number.isFinite(value) || value < 0 || value > 1) {
            return this.ballotProblem(c, confidence, "Confidence is a number from 0 to 1.");
          }
          ballot.confidence = value;
        }
        this.cast(c, phase, ballot);
      });
    }
    form.append(error, el("div", { class: "actions" },
      el("button", { type: "submit", class: "btn btn-primary", "data-testid": "ballot-submit",
        text: phase === "review" ? "Send ranking" : "Send answer" })));
    return form;
  }

  /**
   * The labels to rank: all shown, less this person's own. The server names it (`your_label`)
   * to a caller it can tell is this person (one with a token); otherwise an answer under one
   * label only is surely theirs. `sure` is false when neither tells.
   */
  reviewLabels(c) {
    const shown = c.shown || {};
    const labels = Object.keys(shown).sort();
    if (c.yourLabel) return { labels: labels.filter((l) => l !== c.yourLabel), sure: true };
    const mine = this.ballotOf(c, this.meId(), "propose", 1)?.raw?.answer;
    const own = labels.filter((l) => shown[l] === mine);
    return own.length === 1 ? { labels: labels.filter((l) => l !== own[0]), sure: true } : { labels, sure: false };
  }

  ballotProblem(c, field, message) {
    c.ballotError = message;
    field.setAttribute("aria-invalid", "true");
    field.focus();
    this.renderCouncil(c);
  }

  async cast(c, phase, ballot) {
    const ctx = this.ctx;
    if (!ctx || c.sending) return;
    c.sending = true;
    c.ballotError = "";
    this.renderCouncil(c);
    try {
      await ctx.client.request({ type: "council.ballot", council: c.id, phase, ballot });
      if (this.ctx !== ctx) return;
      // Recorded at once, so the form goes before the next read confirms it.
      c.ballots = [...c.ballots, { member: this.meId(), phase, round: c.round, raw: ballot, valid: true }];
      this.say("Ballot sent.");
      this.refresh(c);
    } catch (error) {
      if (this.ctx === ctx) c.ballotError = `Not accepted: ${describeError(error)}`;
    } finally {
      c.sending = false;
      if (this.ctx === ctx) this.renderCouncil(c);
    }
  }

  // ---- opening a council ----------------------------------------------------------------------

  /** The people of the session as member choices, keeping what was ticked. */
  renderPeople() {
    if (!this.ctx) return;
    const checked = new Set([...this.ui.people.querySelectorAll("input:checked")].map((i) => i.value));
    const meId = this.ctx.client.user?.id;
    const people = this.ctx.people().sort((a, b) => (a.id === meId ? -1 : b.id === meId ? 1 : (a.name || "").localeCompare(b.name || "")));
    if (people.length === 0) {
      this.ui.people.replaceChildren(el("p", { class: "hint", text: "Nobody else is here yet." }));
      return;
    }
    this.ui.people.replaceChildren(...people.map((p) => {
      const id = `council-person-${p.id}`;
      return el("div", { class: "check" },
        el("input", { type: "checkbox", id, value: p.id, checked: checked.has(p.id), disabled: !this.ctx }),
        el("label", { for: id, text: p.id === meId ? `${p.name || "you"} (you)` : p.name || "anonymous" }));
    }));
  }

  setError(field, message) {
    for (const node of this.ui.form.querySelectorAll("[aria-invalid]")) if (node !== field) node.removeAttribute("aria-invalid");
    if (field) showFieldError(field, this.ui.error, message);
    else {
      this.ui.error.textContent = message;
      this.ui.error.hidden = !message;
    }
  }

  /** The form as a council.open frame, or the first problem with it (and the field to fix). */
  read() {
    const u = this.ui;
    const question = u.question.value.trim();
    if (!question) return { field: u.question, problem: "Enter the question the council should answer." };
    const members = [];
    const count = intField(u.count);
    if (count !== null && (!Number.isSafeInteger(count) || count < LIMITS.count[0] || count > LIMITS.count[1])) {
      return { field: u.count, problem: "The number of agents is a whole number from 0 to 64." };
    }
    if (count) {
      const capability = u.capability.value.trim();
      if (!NAME.test(capability)) {
        return { field: u.capability, problem: "Name the capability agents must have: letters, digits, “.”, “_” and “-”." };
      }
      members.push({ capability, count });
    }
    for (const box of u.people.querySelectorAll("input:checked")) members.push({ user: box.value });
    if (members.length === 0) {
      return { field: u.count, problem: "Choose at least one member: a number of agents, or people from the list." };
    }
    const asked = members.reduce((n, m) => n + (m.count || 1), 0);
    if (asked > 64) return { field: u.count, problem: `A council has at most 64 members, not ${asked}.` };
    const strategy = u.strategy.value;
    if (!STRATEGIES.has(strategy)) return { field: u.strategy, problem: "Choose a strategy." };
    const frame = { question, members: members.length === 1 ? members[0] : members, strategy };
    for (const [key, field, label] of [["rounds", u.rounds, "Rounds"], ["phase_timeout_s", u.timeout, "The phase timeout"],
      ["quorum", u.quorum, "Quorum"]]) {
      const [min, max] = LIMITS[key];
      const value = intField(field);
      if (value === null) continue;
      if (!Number.isSafeInteger(value) || value < min || value > max) {
        return { field, problem: `${label} must be a whole number from ${min} to ${max}.` };
      }
      frame[key] = value;
    }
    if ((frame.quorum ?? 1) > asked) {
      return { field: u.quorum, problem: `Quorum ${frame.quorum} is more than the ${asked} member${asked === 1 ? "" : "s"} asked for.` };
    }
    return { frame };
  }

  async open() {
    const ctx = this.ctx;
    if (!ctx || this.sending) return;
    const { frame, field, problem } = this.read();
    if (problem) {
      this.setError(field, problem);
      field.focus();
      return;
    }
    this.setError(null, "");
    this.sending = true;
    this.ui.submit.disabled = true;
    this.ui.status.textContent = "Opening…";
    try {
      const ack = await ctx.client.request({ type: "council.open", session: ctx.session, ...frame });
      if (this.ctx !== ctx) return;
      if (typeof ack.council === "string") {
        const c = this.ensure(ack.council);
        if (!c.question) this.takeSpec(c, { rounds: 1, quorum: 1, ...frame });
        this.refresh(c);
        this.touch(c);
      }
      this.ui.status.textContent = "Council opened; it appears below.";
      this.ui.question.value = "";
      // Out of the way: the council itself is what matters now.
      this.ui.details.open = false;
      this.ui.details.querySelector("summary").focus();
    } catch (error) {
      if (this.ctx !== ctx) return;
      this.ui.status.textContent = "";
      this.setError(null, `Not opened: ${describeError(error)}`);
    } finally {
      this.sending = false;
      if (this.ctx === ctx) this.ui.submit.disabled = false;
    }
  }
}

function short(text, max = 60) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}
