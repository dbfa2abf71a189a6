//! `CouncilActor`: one per open deliberation. It runs the phase state machine (propose, review,
//! revise rounds, synthesize for `chair`, decide), dispatches each agent member's part as a task
//! targeted at that worker, takes people's ballots, and persists its whole state after every
//! change, so that a restarted node resumes it from its phase.
//!
//! A phase ends when every awaited member has answered, or at its deadline; members still
//! silent then abstain, their tasks are canceled, and late answers are ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::model::{BallotRecord, Council, CouncilState, Decision, Phase};
use super::registry::Councils;
use super::strategy::{self, Ballots, Strategy, Tally};
use crate::protocol::{ErrorCode, Refusal, TaskKind};
use crate::session::log::{Actor as LogActor, EventKind, NewEvent};
use crate::session::{AppendEvent, SessionRegistry};
use crate::store::{CouncilRow, SharedStore};
use crate::tasks::{
    CancelTask, SchedulerHandle, SubmitTask, TaskFinished, TaskRequest, TaskState, WatchTask,
};

/// What a council actor needs from its node.
#[derive(Clone)]
pub struct CouncilDeps {
    pub store: SharedStore,
    pub scheduler: Arc<SchedulerHandle>,
    pub sessions: Arc<SessionRegistry>,
    pub councils: Arc<Councils>,
}

/// A person's ballot (`council.ballot`).
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct CastBallot {
    pub user: String,
    pub phase: Phase,
    pub ballot: Value,
}

/// The actor of one council.
pub struct CouncilActor {
    council: Council,
    deps: CouncilDeps,
    /// Bumped per phase, so a stale deadline timer does nothing.
    phase_serial: u64,
    /// Saves go to one writer task, in order. It outlives the actor, so the final save of a
    /// council that just concluded (and stopped) still lands, and a restart after a crash
    /// waits for it (`saver`) before loading the saved state.
    saves: mpsc::UnboundedSender<CouncilRow>,
    saver: Option<JoinHandle<()>>,
    /// Set when the council concludes: dropping it after that is not a crash.
    concluded: bool,
}

impl CouncilActor {
    pub fn new(council: Council, deps: CouncilDeps) -> Self {
        let (saves, mut pending) = mpsc::unbounded_channel::<CouncilRow>();
        let store = deps.store.clone();
        let saver = actix::spawn(async move {
            while let Some(mut row) = pending.recv().await {
                // Only the newest state matters: skip the ones it supersedes.
                while let Ok(newer) = pending.try_recv() {
                    row = newer;
                }
                if let Err(err) = store.save_council(&row).await {
                    tracing::warn!(council = %row.id, %err, "council state not saved");
                }
            }
        });
        Self {
            council,
            deps,
            phase_serial: 0,
            saves,
            saver: Some(saver),
            concluded: false,
        }
    }

    fn actor(&self) -> LogActor {
        LogActor {
            id: format!("council:{}", self.council.id),
            name: "council".to_owned(),
        }
    }

    fn log(&self, kind: EventKind, data: &impl Serialize) {
        match self.deps.sessions.activate(&self.council.session) {
            Ok(addr) => addr.do_send(AppendEvent {
                event: NewEvent::new(kind, self.actor(), data),
            }),
            Err(refusal) => {
                tracing::warn!(council = %self.council.id, %refusal, "council event not logged")
            }
        }
    }

    /// Saves the whole state. A failed save is repaired by the next change's; the state in
    /// memory stays authoritative while the actor lives.
    fn persist(&self, _ctx: &mut Context<Self>) {
        let data = match serde_json::to_string(&self.council) {
            Ok(data) => data,
            Err(err) => {
                tracing::error!(%err, "council state failed to serialize");
                return;
            }
        };
        let row = CouncilRow {
            id: self.council.id.clone(),
            session: self.council.session.clone(),
            state: self.council.state.as_str(),
            data,
            created_at: self.council.created_at,
        };
        if self.saves.send(row).is_err() {
            tracing::error!(council = %self.council.id, "the council's writer is gone");
        }
    }

    /// Who answers in `phase`.
    fn participants(&self, phase: Phase) -> Vec<String> {
        let c = &self.council;
        match phase {
            Phase::Propose => c.members.iter().map(|m| m.id.clone()).collect(),
            // Everyone reviews who has someone else's proposal to rank.
            Phase::Review => c
                .members
                .iter()
                .filter(|m| c.labels.values().any(|owner| owner != &m.id))
                .map(|m| m.id.clone())
                .collect(),
            Phase::Revise => c.finals.keys().cloned().collect(),
            Phase::Synthesize => c.chair.iter().cloned().collect(),
            Phase::Done => Vec::new(),
        }
    }

    /// The proposals a member may see: every label but its own.
    fn others(&self, member: &str, answers: &BTreeMap<String, String>) -> Vec<Value> {
        let own = self.council.label_of(member);
        answers
            .iter()
            .filter(|(label, _)| Some(label.as_str()) != own)
            .map(|(label, answer)| json!({"label": label, "answer": answer}))
            .collect()
    }

    /// Labeled answers: the reviewed proposals, or each labeled member's final answer.
    fn labeled(&self, finals: bool) -> BTreeMap<String, String> {
        let c = &self.council;
        c.labels
            .iter()
            .filter_map(|(label, member)| {
                let answer = if finals {
                    c.finals.get(member)
                } else {
                    c.proposals.get(label)
                };
                answer.map(|p| (label.clone(), p.answer.clone()))
            })
            .collect()
    }

    /// The task input for `member` in the current phase, exactly as PROTOCOL.md shapes it.
    fn input(&self, member: &str) -> Value {
        let c = &self.council;
        match c.phase {
            Phase::Propose => {
                json!({"council": c.id, "question": c.question, "round": 1, "others": []})
            }
            Phase::Revise => json!({"council": c.id, "question": c.question, "round": c.round,
                "others": self.others(member, &self.labeled(true))}),
            Phase::Review => json!({"council": c.id, "question": c.question,
                "proposals": self.others(member, &self.labeled(false))}),
            Phase::Synthesize => {
                let reviews: Vec<Value> = c
                    .reviews
                    .iter()
                    .map(|(reviewer, r)| json!({"reviewer": c.label_of(reviewer), "ranking": r.ranking, "critique": r.critique}))
                    .collect();
                let proposals: Vec<Value> = self
                    .labeled(false)
                    .into_iter()
                    .map(|(label, answer)| json!({"label": label, "answer": answer}))
                    .collect();
                let finals: Vec<Value> = self
                    .labeled(true)
                    .into_iter()
                    .map(|(label, answer)| json!({"label": label, "answer": answer}))
                    .collect();
                json!({"council": c.id, "question": c.question, "proposals": proposals,
                    "reviews": reviews, "finals": finals, "strategy": c.strategy})
            }
            Phase::Done => Value::Null,
        }
    }

    fn start_phase(&mut self, phase: Phase, round: u32, ctx: &mut Context<Self>) {
        let timeout = chrono::Duration::seconds(i64::from(self.council.phase_timeout_s));
        self.council.phase = phase;
        self.council.round = round;
        self.council.deadline = Some(Utc::now() + timeout);
        let participants = self.participants(phase);
        self.council.waiting = participants.iter().map(|m| (m.clone(), None)).collect();
        self.persist(ctx);
        let shown = match phase {
            Phase::Review | Phase::Synthesize => Some(self.labeled(false)),
            Phase::Revise => Some(self.labeled(true)),
            _ => None,
        };
        self.log(
            EventKind::CouncilPhase,
            &json!({"council": self.council.id, "phase": phase, "round": round,
                "deadline": self.council.deadline.map(|d| d.to_rfc3339()),
                "awaiting": participants.len(), "proposals": shown}),
        );
        // The deadline is armed first: it names the phase that dispatches belong to.
        self.arm_deadline(ctx);
        for member in participants {
            self.dispatch(member, ctx);
        }
        self.maybe_end_phase(ctx);
    }

    /// Sends an agent member its task for the phase; people answer on their own.
    fn dispatch(&mut self, member: String, ctx: &mut Context<Self>) {
        let Some(worker) = self.council.member(&member).and_then(|m| m.worker.clone()) else {
            return;
        };
        let Some(kind) = self
            .council
            .phase
            .task_kind()
            .and_then(|k| TaskKind::parse(k).ok())
        else {
            return;
        };
        let request = TaskRequest {
            kind,
            input: Some(self.input(&member)),
            priority: Some(0),
            max_attempts: Some(1),
            timeout_s: Some(i64::from(self.council.phase_timeout_s)),
        };
        let spec = match request.validate() {
            Ok(spec) => spec,
            Err(refusal) => return self.record_answer(&member, Err(refusal.message), ctx),
        };
        let serial = self.phase_serial;
        self.deps
            .scheduler
            .addr()
            .send(SubmitTask {
                session: self.council.session.clone(),
                spec,
                actor: self.actor(),
                target: Some(worker),
                watcher: Some(ctx.address().recipient()),
            })
            .into_actor(self)
            .map(move |submitted, act, ctx| {
                if act.phase_serial != serial {
                    return;
                }
                match submitted {
                    Ok(Ok(task)) => {
                        if let Some(slot) = act.council.waiting.get_mut(&member) {
                            *slot = Some(task.id);
                            act.persist(ctx);
                        }
                    }
                    _ => {
                        act.record_answer(&member, Err("its task could not be queued".into()), ctx)
                    }
                }
            })
            .wait(ctx);
    }

    fn arm_deadline(&mut self, ctx: &mut Context<Self>) {
        self.phase_serial += 1;
        let serial = self.phase_serial;
        let Some(deadline) = self.council.deadline else {
            return;
        };
        let wait = (deadline - Utc::now()).to_std().unwrap_or_default();
        ctx.run_later(wait, move |act, ctx| {
            if act.phase_serial == serial {
                act.end_phase(ctx);
            }
        });
    }

    /// Records one member's answer to the current phase, valid or not.
    fn record_answer(
        &mut self,
        member: &str,
        answer: Result<Value, String>,
        ctx: &mut Context<Self>,
    ) {
        if self.council.waiting.remove(member).is_none() {
            return;
        }
        let (raw, parsed) = match answer {
            Ok(raw) => {
                let parsed = self.accept(member, &raw);
                (raw, parsed)
            }
            Err(error) => (Value::Null, Err(error)),
        };
        self.audit(member, raw, parsed, false);
        self.persist(ctx);
        self.maybe_end_phase(ctx);
    }

    /// Adds one ballot of the current phase to the audit trail.
    fn audit(&mut self, member: &str, raw: Value, parsed: Result<(), String>, abstained: bool) {
        self.council.ballots.push(BallotRecord {
            member: member.to_owned(),
            phase: self.council.phase,
            round: self.council.round,
            raw,
            valid: parsed.is_ok(),
            error: parsed.err(),
            abstained,
            at: Utc::now(),
        });
    }

    /// Parses a ballot for the current phase and keeps it if valid.
    fn accept(&mut self, member: &str, raw: &Value) -> Result<(), String> {
        let c = &mut self.council;
        match c.phase {
            Phase::Propose | Phase::Revise => {
                let proposal = strategy::parse_proposal(raw)?;
                c.finals.insert(member.to_owned(), proposal);
            }
            Phase::Review => {
                let own = c.label_of(member).map(str::to_owned);
                let shown: Vec<String> = c
                    .labels
                    .keys()
                    .filter(|l| Some(l.as_str()) != own.as_deref())
                    .cloned()
                    .collect();
                let review = strategy::parse_review(raw, &shown, own.as_deref())?;
                c.reviews.insert(member.to_owned(), review);
            }
            Phase::Synthesize => c.synthesis = Some(strategy::parse_synthesis(raw)?),
            Phase::Done => return Err("the council is over".into()),
        }
        Ok(())
    }

    fn maybe_end_phase(&mut self, ctx: &mut Context<Self>) {
        if self.council.waiting.is_empty() && self.council.state == CouncilState::Deliberating {
            self.end_phase(ctx);
        }
    }

    fn end_phase(&mut self, ctx: &mut Context<Self>) {
        // Whoever is still silent abstains; their tasks are taken back.
        let silent = std::mem::take(&mut self.council.waiting);
        for (member, task) in silent {
            if let Some(task) = task {
                self.deps.scheduler.addr().do_send(CancelTask {
                    task,
                    actor: self.actor(),
                });
            }
            let silent = Err("no answer within phase_timeout_s".to_owned());
            self.audit(&member, Value::Null, silent, true);
        }
        self.phase_serial += 1;
        let c = &self.council;
        let quorum = c.quorum as usize;
        match c.phase {
            Phase::Propose => {
                if c.finals.len() < quorum {
                    let reason =
                        format!("{} valid proposals; the quorum is {quorum}", c.finals.len());
                    return self.finish_without(reason, ctx);
                }
                self.draw_labels();
                self.start_phase(Phase::Review, 1, ctx);
            }
            Phase::Review => {
                if c.strategy == Strategy::Borda && c.reviews.len() < quorum {
                    let reason =
                        format!("{} valid reviews; the quorum is {quorum}", c.reviews.len());
                    return self.finish_without(reason, ctx);
                }
                self.next_round_or_decide(2, ctx);
            }
            Phase::Revise => {
                let next = c.round + 1;
                self.next_round_or_decide(next, ctx);
            }
            Phase::Synthesize => match self.council.synthesis.clone() {
                Some(answer) => {
                    let tally = self.tally(Some(answer));
                    self.finish(tally, ctx);
                }
                None => self.finish_without("the chair gave no valid synthesis".into(), ctx),
            },
            Phase::Done => {}
        }
    }

    /// Another revision round while rounds remain and members disagree; else the decision.
    fn next_round_or_decide(&mut self, round: u32, ctx: &mut Context<Self>) {
        let c = &self.council;
        if round <= c.rounds && !strategy::agree(&c.finals) {
            return self.start_phase(Phase::Revise, round, ctx);
        }
        if c.strategy == Strategy::Chair {
            // The chair is the first member, in the council's member order, with a proposal.
            let chair = c
                .members
                .iter()
                .find(|m| c.finals.contains_key(&m.id))
                .map(|m| m.id.clone());
            let round = c.round;
            self.council.chair = chair;
            return self.start_phase(Phase::Synthesize, round, ctx);
        }
        let tally = self.tally(None);
        self.finish(tally, ctx);
    }

    /// Shuffles the members with a valid proposal under labels A, B, C…
    fn draw_labels(&mut self) {
        let mut proposers: Vec<String> = self.council.finals.keys().cloned().collect();
        rand::seq::SliceRandom::shuffle(proposers.as_mut_slice(), &mut rand::rng());
        for (i, member) in proposers.into_iter().enumerate() {
            let label = label_for(i);
            if let Some(p) = self.council.finals.get(&member) {
                self.council.proposals.insert(label.clone(), p.clone());
            }
            self.council.labels.insert(label, member);
        }
    }

    /// Tallies the ballots: by the strategy, or around the chair's synthesis.
    fn tally(&self, synthesis: Option<String>) -> Tally {
        let reviews: Vec<strategy::Review> = self.council.reviews.values().cloned().collect();
        let ballots = Ballots {
            finals: &self.council.finals,
            labeled: &self.council.proposals,
            reviews: &reviews,
        };
        match synthesis {
            Some(answer) => strategy::chair_decides(answer, &ballots),
            None => strategy::decide(self.council.strategy, &ballots),
        }
    }

    fn finish(&mut self, tally: Tally, ctx: &mut Context<Self>) {
        let abstained = self
            .council
            .members
            .iter()
            .filter(|m| !self.council.finals.contains_key(&m.id))
            .map(|m| m.id.clone())
            .collect();
        let decision = Decision {
            outcome: CouncilState::Decided,
            answer: tally.answer,
            reason: None,
            scores: tally.scores,
            weights: tally.weights,
            tie_break: tally.tie_break.map(str::to_owned),
            dissent: tally.dissent,
            abstained,
        };
        self.conclude(CouncilState::Decided, decision, ctx);
    }

    fn finish_without(&mut self, reason: String, ctx: &mut Context<Self>) {
        let decision = Decision {
            outcome: CouncilState::NoQuorum,
            answer: None,
            reason: Some(reason),
            scores: BTreeMap::new(),
            weights: BTreeMap::new(),
            tie_break: None,
            dissent: Vec::new(),
            abstained: self
                .council
                .members
                .iter()
                .map(|m| m.id.clone())
                .filter(|m| !self.council.finals.contains_key(m))
                .collect(),
        };
        self.conclude(CouncilState::NoQuorum, decision, ctx);
    }

    fn conclude(&mut self, state: CouncilState, decision: Decision, ctx: &mut Context<Self>) {
        let c = &mut self.council;
        c.state = state;
        c.phase = Phase::Done;
        c.deadline = None;
        c.decision = Some(decision.clone());
        self.persist(ctx);
        let c = &self.council;
        self.log(
            EventKind::CouncilDecided,
            &json!({"council": c.id, "question": c.question, "strategy": c.strategy,
                "decision": decision, "label_map": c.labels, "ballots": c.ballots,
                "weights": decision.weights, "tie_break": decision.tie_break,
                "dissent": decision.dissent, "chair": c.chair}),
        );
        tracing::info!(council = %c.id, outcome = state.as_str(), "council concluded");
        self.concluded = true;
        ctx.stop();
    }
}

/// A, B, … Z, then A2, B2, …
fn label_for(i: usize) -> String {
    let letter = char::from(b'A' + u8::try_from(i % 26).unwrap_or(0));
    match i / 26 {
        0 => letter.to_string(),
        n => format!("{letter}{}", n + 1),
    }
}

impl Actor for CouncilActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.council.ballots.is_empty()
            && self.council.waiting.is_empty()
            && self.council.labels.is_empty()
        {
            // Fresh: announce, then the first phase.
            let c = &self.council;
            self.log(
                EventKind::CouncilOpened,
                &json!({"council": c.id, "question": c.question, "strategy": c.strategy,
                    "rounds": c.rounds, "quorum": c.quorum, "phase_timeout_s": c.phase_timeout_s,
                    "members": c.members.len(), "opened_by": c.opened_by}),
            );
            if c.members.is_empty() {
                return self.finish_without("no members were available".into(), ctx);
            }
            return self.start_phase(Phase::Propose, 1, ctx);
        }
        // Resumed after a restart: watch the outstanding tasks again (an answer that came while
        // the node was down is delivered at once), and keep the phase's deadline.
        tracing::info!(council = %self.council.id, phase = ?self.council.phase, "resuming council");
        let recipient = ctx.address().recipient::<TaskFinished>();
        for task in self.council.waiting.values().flatten() {
            self.deps.scheduler.addr().do_send(WatchTask {
                task: task.clone(),
                watcher: recipient.clone(),
            });
        }
        // Agents whose task was never queued before the crash get it now.
        let undispatched: Vec<String> = self
            .council
            .waiting
            .iter()
            .filter(|(_, task)| task.is_none())
            .map(|(m, _)| m.clone())
            .collect();
        self.arm_deadline(ctx);
        for member in undispatched {
            self.dispatch(member, ctx);
        }
        self.maybe_end_phase(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.deps.councils.retire(&self.council.id);
    }
}

/// The supervision hook: a council dropped before it concluded crashed (a panic unwinds through
/// here), or its arbiter is stopping; the registry decides which, and restarts it from its saved
/// state.
impl Drop for CouncilActor {
    fn drop(&mut self) {
        if self.concluded {
            return;
        }
        if let Some(saver) = self.saver.take() {
            self.deps
                .councils
                .restart_crashed(self.council.id.clone(), saver);
        }
    }
}

/// Makes a council panic, to test its supervision. Only in `fault-injection` builds.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectCouncilPanic;

#[cfg(feature = "fault-injection")]
impl Handler<InjectCouncilPanic> for CouncilActor {
    type Result = ();

    fn handle(&mut self, _: InjectCouncilPanic, _ctx: &mut Context<Self>) {
        panic!("injected panic in council {}", self.council.id);
    }
}

impl Handler<TaskFinished> for CouncilActor {
    type Result = ();

    fn handle(&mut self, msg: TaskFinished, ctx: &mut Context<Self>) {
        let member = self
            .council
            .waiting
            .iter()
            .find(|(_, task)| task.as_ref() == Some(&msg.task))
            .map(|(m, _)| m.clone());
        let Some(member) = member else {
            return; // a late answer to a phase that is over
        };
        let answer = match (msg.state, msg.output) {
            (TaskState::Completed, Some(output)) => Ok(output),
            (state, _) => Err(msg
                .error
                .unwrap_or_else(|| format!("its task ended {}", state.as_str()))),
        };
        self.record_answer(&member, answer, ctx);
    }
}

impl Handler<CastBallot> for CouncilActor {
    type Result = Result<(), Refusal>;

    fn handle(&mut self, msg: CastBallot, ctx: &mut Context<Self>) -> Self::Result {
        let member = format!("user:{}", msg.user);
        if self.council.member(&member).is_none() {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "you are not a member of this council",
            ));
        }
        let current = self.council.phase;
        let matches =
            msg.phase == current || (msg.phase == Phase::Propose && current == Phase::Revise);
        if !matches || !self.council.waiting.contains_key(&member) {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "the council is in its {current:?} phase and awaits no {:?} ballot from you",
                    msg.phase
                ),
            ));
        }
        let parsed = self.accept(&member, &msg.ballot);
        let refused = parsed.as_ref().err().cloned();
        self.audit(&member, msg.ballot, parsed, false);
        if refused.is_none() {
            // Before the save: a council restarted from it must not wait for this member again.
            self.council.waiting.remove(&member);
        }
        self.persist(ctx);
        if let Some(error) = refused {
            // Audited; the person may still send a valid ballot before the phase ends.
            return Err(Refusal::bad_request(format!("invalid ballot: {error}")));
        }
        self.maybe_end_phase(ctx);
        Ok(())
    }
}
