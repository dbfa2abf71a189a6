//! The session event log's record: one ordered, durable event with a gap-free offset.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    pub id: String,
    pub name: String,
}

/// The kinds of event a session log holds. Stored and sent by their dotted names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventKind {
    #[serde(rename = "chat")]
    Chat,
    #[serde(rename = "member.joined")]
    MemberJoined,
    #[serde(rename = "member.left")]
    MemberLeft,
    #[serde(rename = "task.submitted")]
    TaskSubmitted,
    #[serde(rename = "task.working")]
    TaskWorking,
    #[serde(rename = "task.progress")]
    TaskProgress,
    #[serde(rename = "task.retrying")]
    TaskRetrying,
    #[serde(rename = "task.completed")]
    TaskCompleted,
    #[serde(rename = "task.failed")]
    TaskFailed,
    #[serde(rename = "task.canceled")]
    TaskCanceled,
    #[serde(rename = "council.opened")]
    CouncilOpened,
    #[serde(rename = "council.phase")]
    CouncilPhase,
    #[serde(rename = "council.decided")]
    CouncilDecided,
}

impl EventKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::MemberJoined => "member.joined",
            Self::MemberLeft => "member.left",
            Self::TaskSubmitted => "task.submitted",
            Self::TaskWorking => "task.working",
            Self::TaskProgress => "task.progress",
            Self::TaskRetrying => "task.retrying",
            Self::TaskCompleted => "task.completed",
            Self::TaskFailed => "task.failed",
            Self::TaskCanceled => "task.canceled",
            Self::CouncilOpened => "council.opened",
            Self::CouncilPhase => "council.phase",
            Self::CouncilDecided => "council.decided",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "chat" => Self::Chat,
            "member.joined" => Self::MemberJoined,
            "member.left" => Self::MemberLeft,
            "task.submitted" => Self::TaskSubmitted,
            "task.working" => Self::TaskWorking,
            "task.progress" => Self::TaskProgress,
            "task.retrying" => Self::TaskRetrying,
            "task.completed" => Self::TaskCompleted,
            "task.failed" => Self::TaskFailed,
            "task.canceled" => Self::TaskCanceled,
            "council.opened" => Self::CouncilOpened,
            "council.phase" => Self::CouncilPhase,
            "council.decided" => Self::CouncilDecided,
            _ => return None,
        })
    }
}

/// One committed event. `data` is kept as the JSON text it was stored with: the log never looks
/// inside it, and serving it needs no re-encoding.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub offset: u64,
    pub kind: EventKind,
    pub actor: Actor,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub data: Box<RawValue>,
}

/// An event before the log has given it an offset. It travels between nodes as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEvent {
    pub kind: EventKind,
    pub actor: Actor,
    pub at: DateTime<Utc>,
    pub data: Box<RawValue>,
}

impl NewEvent {
    /// Builds an event whose data is a typed payload, encoded once here.
    pub fn new(kind: EventKind, actor: Actor, data: &impl Serialize) -> Self {
        let data = serde_json::value::to_raw_value(data).unwrap_or_else(|err| {
            tracing::error!(%err, "event data failed to serialize");
            RawValue::NULL.to_owned()
        });
        Self {
            kind,
            actor,
            at: Utc::now(),
            data,
        }
    }

    pub fn at_offset(self, offset: u64) -> Event {
        Event {
            offset,
            kind: self.kind,
            actor: self.actor,
            at: self.at,
            data: self.data,
        }
    }
}

/// Serializes a time as PROTOCOL.md wants it: RFC 3339 in UTC, to the millisecond.
pub fn rfc3339<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// `data` of a `chat` event.
#[derive(Debug, Serialize)]
pub struct ChatData<'a> {
    pub text: &'a str,
}

/// `data` of `member.joined` and `member.left`.
#[derive(Debug, Serialize)]
pub struct MemberData<'a> {
    pub user: &'a crate::protocol::UserInfo,
}

/// `data` of every `task.*` event: the task, its attempt, and what the transition carries.
#[derive(Debug, Serialize)]
pub struct TaskEventData<'a> {
    pub task: &'a crate::protocol::TaskId,
    pub kind: &'a crate::protocol::TaskKind,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<&'a crate::protocol::WorkerId>,
    /// `task.progress`: the worker's data, opaque.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<&'a RawValue>,
    /// `task.completed`: the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<&'a RawValue>,
    /// `task.failed` and `task.retrying`: the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// `task.retrying`: when the next attempt may start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
}

impl<'a> TaskEventData<'a> {
    /// The data every `task.*` event carries; the transition adds its own fields.
    pub fn new(
        task: &'a crate::protocol::TaskId,
        kind: &'a crate::protocol::TaskKind,
        attempt: u32,
        worker: Option<&'a crate::protocol::WorkerId>,
    ) -> Self {
        Self {
            task,
            kind,
            attempt,
            worker,
            progress: None,
            output: None,
            error: None,
            not_before: None,
        }
    }
}
