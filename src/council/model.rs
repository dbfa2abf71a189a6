//! A council as it is opened, persisted and shown: the request and its validation, the members,
//! the phase state, every ballot, and the decision with its audit trail.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::strategy::{Proposal, Review, Strategy};
use crate::protocol::{CouncilId, Refusal, SessionId, TaskId, TaskKind, WorkerId};

pub const MAX_ROUNDS: i64 = 10;
pub const MAX_PHASE_TIMEOUT_S: i64 = 3600;
pub const MAX_MEMBERS: i64 = 64;
const MAX_QUESTION: usize = 16 * 1024;

/// One way to name members in `council.open`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MemberSpec {
    /// Up to `count` connected workers with this capability, least loaded first.
    Capability {
        #[schema(value_type = String)]
        capability: TaskKind,
        count: i64,
    },
    /// One worker, by id.
    Worker {
        #[schema(value_type = String)]
        worker: WorkerId,
    },
    /// A person, who answers with `council.ballot` frames.
    User { user: String },
}

/// `members`: one spec, or a list of them.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MembersSpec {
    One(MemberSpec),
    Many(Vec<MemberSpec>),
}

impl MembersSpec {
    pub fn specs(&self) -> Vec<MemberSpec> {
        match self {
            Self::One(spec) => vec![spec.clone()],
            Self::Many(specs) => specs.clone(),
        }
    }
}

/// The fields of `council.open` and `POST /v1/sessions/{id}/councils`. Numbers are read wide so
/// that out-of-range values get a clear `bad_request`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CouncilRequest {
    pub question: String,
    pub members: MembersSpec,
    pub strategy: Strategy,
    #[serde(default)]
    pub rounds: Option<i64>,
    #[serde(default)]
    pub phase_timeout_s: Option<i64>,
    #[serde(default)]
    pub quorum: Option<i64>,
}

/// A request that passed validation; its capability members are resolved when it opens.
#[derive(Debug, Clone)]
pub struct CouncilSpec {
    pub question: String,
    pub members: Vec<MemberSpec>,
    pub strategy: Strategy,
    pub rounds: u32,
    pub phase_timeout_s: u32,
    pub quorum: u32,
}

fn in_range(name: &str, value: i64, min: i64, max: i64) -> Result<u32, Refusal> {
    if (min..=max).contains(&value) {
        u32::try_from(value).map_err(|_| Refusal::bad_request(format!("{name} is out of range")))
    } else {
        Err(Refusal::bad_request(format!(
            "{name} must be between {min} and {max}, not {value}"
        )))
    }
}

impl CouncilRequest {
    pub fn validate(self) -> Result<CouncilSpec, Refusal> {
        if self.question.trim().is_empty() || self.question.len() > MAX_QUESTION {
            return Err(Refusal::bad_request(format!(
                "the question must be 1 to {MAX_QUESTION} bytes"
            )));
        }
        let members = self.members.specs();
        let mut requested = 0;
        for spec in &members {
            requested += match spec {
                MemberSpec::Capability { count, .. } => {
                    i64::from(in_range("members.count", *count, 1, MAX_MEMBERS)?)
                }
                MemberSpec::Worker { .. } | MemberSpec::User { .. } => 1,
            };
        }
        let requested = in_range("the number of members", requested, 1, MAX_MEMBERS)?;
        let quorum = in_range("quorum", self.quorum.unwrap_or(1), 1, MAX_MEMBERS)?;
        if quorum > requested {
            return Err(Refusal::bad_request(format!(
                "quorum {quorum} is more than the {requested} members asked for"
            )));
        }
        Ok(CouncilSpec {
            question: self.question,
            members,
            strategy: self.strategy,
            rounds: in_range("rounds", self.rounds.unwrap_or(1), 1, MAX_ROUNDS)?,
            phase_timeout_s: in_range(
                "phase_timeout_s",
                self.phase_timeout_s.unwrap_or(60),
                1,
                MAX_PHASE_TIMEOUT_S,
            )?,
            quorum,
        })
    }
}

/// A council member: a worker agent or a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    /// `worker:<id>` or `user:<id>`.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub worker: Option<WorkerId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Member {
    pub fn agent(worker: WorkerId) -> Self {
        Self {
            id: format!("worker:{worker}"),
            worker: Some(worker),
            user: None,
        }
    }

    pub fn person(user: &str) -> Self {
        Self {
            id: format!("user:{user}"),
            worker: None,
            user: Some(user.to_owned()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CouncilState {
    Deliberating,
    Decided,
    NoQuorum,
    Canceled,
}

impl CouncilState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deliberating => "deliberating",
            Self::Decided => "decided",
            Self::NoQuorum => "no_quorum",
            Self::Canceled => "canceled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Propose,
    Review,
    Revise,
    Synthesize,
    Done,
}

impl Phase {
    /// The task kind an agent member gets in this phase.
    pub fn task_kind(self) -> Option<&'static str> {
        match self {
            Self::Propose | Self::Revise => Some("council.propose"),
            Self::Review => Some("council.review"),
            Self::Synthesize => Some("council.synthesize"),
            Self::Done => None,
        }
    }
}

/// One answer a member gave, valid or not, or its abstention.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BallotRecord {
    pub member: String,
    pub phase: Phase,
    pub round: u32,
    /// What the member sent (the task output, or the person's ballot); null when it abstained.
    #[schema(value_type = Object)]
    pub raw: Value,
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub abstained: bool,
    #[serde(serialize_with = "crate::session::log::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: DateTime<Utc>,
}

/// How the council ended, with its audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// `decided` or `no_quorum`.
    pub outcome: CouncilState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Why there was no decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub scores: BTreeMap<String, f64>,
    pub weights: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_break: Option<String>,
    /// Members whose final answer lost.
    pub dissent: Vec<String>,
    /// Members with no valid final answer.
    pub abstained: Vec<String>,
}

/// The whole state of a council, persisted as JSON after every change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Council {
    pub id: CouncilId,
    pub session: SessionId,
    pub question: String,
    pub strategy: Strategy,
    pub rounds: u32,
    pub phase_timeout_s: u32,
    pub quorum: u32,
    pub members: Vec<Member>,
    pub state: CouncilState,
    pub phase: Phase,
    pub round: u32,
    /// When the current phase ends; unanswered members abstain then.
    pub deadline: Option<DateTime<Utc>>,
    /// Label → member, drawn at random when the proposals are in.
    pub labels: BTreeMap<String, String>,
    /// The round-1 proposal under each label, as reviewers saw it.
    pub proposals: BTreeMap<String, Proposal>,
    /// Each member's latest valid answer.
    pub finals: BTreeMap<String, Proposal>,
    /// Each member's valid review.
    pub reviews: BTreeMap<String, Review>,
    pub synthesis: Option<String>,
    pub chair: Option<String>,
    pub ballots: Vec<BallotRecord>,
    /// Members whose answer this phase is awaited, with the task carrying it (agents).
    pub waiting: BTreeMap<String, Option<TaskId>>,
    pub decision: Option<Decision>,
    pub opened_by: String,
    pub created_at: DateTime<Utc>,
}

impl Council {
    pub fn label_of(&self, member: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(_, m)| m.as_str() == member)
            .map(|(l, _)| l.as_str())
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

/// `GET /v1/councils/{id}`. The label map is shown only once the council is over: while it
/// deliberates, labels are how members stay anonymous to each other.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CouncilView {
    #[schema(value_type = String)]
    pub id: CouncilId,
    #[schema(value_type = String)]
    pub session: SessionId,
    pub state: CouncilState,
    pub phase: Phase,
    pub round: u32,
    pub question: String,
    pub strategy: Strategy,
    pub rounds: u32,
    pub quorum: u32,
    pub phase_timeout_s: u32,
    pub members: Vec<Member>,
    pub ballots: Vec<BallotRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_map: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The label of the caller's own proposal, when the caller is a member with one: a person
    /// must leave it out of their ranking, and cannot tell it from identical answers otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub your_label: Option<String>,
    #[serde(serialize_with = "crate::session::log::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

impl From<Council> for CouncilView {
    fn from(c: Council) -> Self {
        let over = c.state != CouncilState::Deliberating;
        Self {
            id: c.id,
            session: c.session,
            state: c.state,
            phase: c.phase,
            round: c.round,
            question: c.question,
            strategy: c.strategy,
            rounds: c.rounds,
            quorum: c.quorum,
            phase_timeout_s: c.phase_timeout_s,
            members: c.members,
            ballots: c.ballots,
            label_map: over.then_some(c.labels),
            decision: c.decision,
            your_label: None,
            created_at: c.created_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<CouncilSpec, Refusal> {
        serde_json::from_str::<CouncilRequest>(json)
            .map_err(|e| Refusal::bad_request(e.to_string()))?
            .validate()
    }

    #[test]
    fn validation() {
        let ok = request(
            r#"{"question":"q","members":{"capability":"council","count":3},"strategy":"borda","quorum":2}"#,
        )
        .unwrap();
        assert_eq!((ok.rounds, ok.phase_timeout_s, ok.quorum), (1, 60, 2));
        let mixed = request(
            r#"{"question":"q","members":[{"worker":"w1"},{"user":"ada"}],"strategy":"majority","quorum":2}"#,
        )
        .unwrap();
        assert_eq!(mixed.members.len(), 2);
        for bad in [
            r#"{"question":"q","members":{"capability":"c","count":2},"strategy":"plurality"}"#,
            r#"{"question":"q","members":{"capability":"c","count":2},"strategy":"borda","quorum":3}"#,
            r#"{"question":"q","members":{"capability":"c","count":2},"strategy":"borda","rounds":0}"#,
            r#"{"question":"q","members":{"capability":"c","count":2},"strategy":"borda","phase_timeout_s":0}"#,
            r#"{"question":"q","members":{"capability":"c","count":-1},"strategy":"borda"}"#,
            r#"{"question":" ","members":{"user":"a"},"strategy":"borda"}"#,
        ] {
            assert!(request(bad).is_err(), "{bad}");
        }
    }
}
