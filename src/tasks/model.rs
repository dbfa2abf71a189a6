//! The task as the store keeps it and REST shows it, the validated submission, and the
//! transitions the scheduler asks the store to make.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{LeaseId, Refusal, SessionId, TaskId, TaskKind, WorkerId};

/// The A2A task states. `rejected` is reserved for tasks the server refuses after accepting
/// them; nothing produces it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Submitted,
    Working,
    Completed,
    Failed,
    Canceled,
    Rejected,
}

impl TaskState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Working => "working",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "submitted" => Self::Submitted,
            "working" => Self::Working,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }

    /// Whether the task is done for good.
    pub const fn is_terminal(self) -> bool {
        !matches!(self, Self::Submitted | Self::Working)
    }
}

/// The bounds on a submission; outside them the answer is `bad_request`.
pub const MAX_PRIORITY: i32 = 1000;
pub const MAX_ATTEMPTS: u32 = 100;
pub const MAX_TIMEOUT_S: u32 = 86_400;
pub const DEFAULT_ATTEMPTS: u32 = 3;
pub const DEFAULT_TIMEOUT_S: u32 = 60;

/// The fields of `task.submit` and `POST /v1/sessions/{id}/tasks`, as they arrive. Numbers are
/// read wide so that a negative or huge value is refused with a clear message instead of a
/// parse error.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TaskRequest {
    #[schema(value_type = String)]
    pub kind: TaskKind,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: Option<serde_json::Value>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub max_attempts: Option<i64>,
    #[serde(default)]
    pub timeout_s: Option<i64>,
}

/// A submission that passed validation.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub kind: TaskKind,
    pub input: Box<RawValue>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_s: u32,
}

fn bounded(
    name: &str,
    value: Option<i64>,
    min: i64,
    max: i64,
    default: i64,
) -> Result<i64, Refusal> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Refusal::bad_request(format!(
            "{name} must be between {min} and {max}, not {value}"
        )))
    }
}

impl TaskRequest {
    pub fn validate(self) -> Result<TaskSpec, Refusal> {
        let priority = bounded("priority", self.priority, 0, MAX_PRIORITY.into(), 0)?;
        let max_attempts = bounded(
            "max_attempts",
            self.max_attempts,
            1,
            MAX_ATTEMPTS.into(),
            DEFAULT_ATTEMPTS.into(),
        )?;
        let timeout_s = bounded(
            "timeout_s",
            self.timeout_s,
            1,
            MAX_TIMEOUT_S.into(),
            DEFAULT_TIMEOUT_S.into(),
        )?;
        let input = self.input.unwrap_or(serde_json::Value::Null);
        let input = serde_json::value::to_raw_value(&input)
            .map_err(|err| Refusal::bad_request(format!("task input: {err}")))?;
        // The bounds above make these conversions exact.
        Ok(TaskSpec {
            kind: self.kind,
            input,
            priority: i32::try_from(priority).unwrap_or(0),
            max_attempts: u32::try_from(max_attempts).unwrap_or(DEFAULT_ATTEMPTS),
            timeout_s: u32::try_from(timeout_s).unwrap_or(DEFAULT_TIMEOUT_S),
        })
    }
}

/// A task row, as `GET /v1/tasks/{id}` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TaskRecord {
    #[schema(value_type = String)]
    pub id: TaskId,
    #[schema(value_type = String)]
    pub kind: TaskKind,
    pub state: TaskState,
    /// Assignments so far; 0 while it has never run.
    pub attempt: u32,
    #[schema(value_type = String)]
    pub session: SessionId,
    #[schema(value_type = Object)]
    pub input: Box<RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Box<RawValue>>,
    /// The last error: kept after a retry, and final once the task has failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_s: u32,
    /// The worker holding the task while it is working.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub worker: Option<WorkerId>,
    pub submitted_by: String,
    #[serde(serialize_with = "crate::session::log::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::session::log::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub session: SessionId,
    pub spec: TaskSpec,
    pub submitted_by: String,
    pub at: DateTime<Utc>,
    /// Only this worker may take the task (a council member's work), whatever its kind.
    pub target: Option<WorkerId>,
}

/// A task just claimed for a worker: what its `assign` frame carries.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub id: TaskId,
    pub lease: LeaseId,
    pub session: SessionId,
    pub kind: TaskKind,
    pub input: Box<RawValue>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub deadline: DateTime<Utc>,
}

/// A claim of queued tasks of the given kinds that are due by `now`. Each claimed task gets a
/// fresh lease that expires `lease_ttl_ms` from now unless renewed.
#[derive(Debug, Clone)]
pub struct Claim {
    pub kinds: Vec<TaskKind>,
    pub now: DateTime<Utc>,
    pub lease_ttl_ms: i64,
}

/// Which task rows a transition may touch: the fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Working under exactly this lease.
    Lease(LeaseId),
    /// Queued or working, under any lease: a cancel.
    Open,
}

/// Where a transition takes the task.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed {
        output: Box<RawValue>,
    },
    /// Failed for good, with its error kept.
    Failed {
        error: String,
    },
    /// Back to the queue after `not_before`, with its error kept.
    Retry {
        error: String,
        not_before: DateTime<Utc>,
    },
    /// Back to the queue at once, the attempt not counted: a claim no worker could take.
    Release,
    Canceled,
}

impl Outcome {
    pub fn state(&self) -> TaskState {
        match self {
            Self::Completed { .. } => TaskState::Completed,
            Self::Failed { .. } => TaskState::Failed,
            Self::Retry { .. } | Self::Release => TaskState::Submitted,
            Self::Canceled => TaskState::Canceled,
        }
    }
}

/// One fenced transition.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub task: TaskId,
    pub expect: Expect,
    pub outcome: Outcome,
}

/// A transition the store made: enough for the session log's event.
#[derive(Debug, Clone)]
pub struct Settled {
    pub session: SessionId,
    pub kind: TaskKind,
    pub attempt: u32,
}

/// Heartbeat renewals: every lease `worker` holds now expires at `expires`.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub worker: WorkerId,
    pub expires: DateTime<Utc>,
}

/// The writes of one scheduler batch, made in one transaction.
#[derive(Debug, Default)]
pub struct TaskWrites {
    pub inserts: Vec<NewTask>,
    pub settlements: Vec<Settlement>,
    pub renewals: Vec<Renewal>,
}

impl TaskWrites {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.settlements.is_empty() && self.renewals.is_empty()
    }
}

/// A working task whose lease or deadline has passed.
#[derive(Debug, Clone)]
pub struct ExpiredLease {
    pub task: TaskId,
    pub lease: LeaseId,
    pub attempt: u32,
    pub max_attempts: u32,
    /// True when the task ran past its `timeout_s`; false when its lease lapsed.
    pub timed_out: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<TaskSpec, Refusal> {
        serde_json::from_str::<TaskRequest>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn defaults_and_bounds() {
        let spec = request(r#"{"kind":"k"}"#).unwrap();
        assert_eq!(
            (spec.priority, spec.max_attempts, spec.timeout_s),
            (0, 3, 60)
        );
        assert_eq!(spec.input.get(), "null");
        for bad in [
            r#"{"kind":"k","priority":-1}"#,
            r#"{"kind":"k","priority":1001}"#,
            r#"{"kind":"k","max_attempts":0}"#,
            r#"{"kind":"k","max_attempts":1000000000000}"#,
            r#"{"kind":"k","timeout_s":-5}"#,
            r#"{"kind":"k","timeout_s":86401}"#,
        ] {
            assert!(request(bad).is_err(), "{bad}");
        }
    }
}
