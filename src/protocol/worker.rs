//! The worker socket's protocol (`/v1/workers`, PROTOCOL.md "Worker socket"): what a worker
//! sends and what the server sends it.
//!
//! Both directions derive `Serialize` and `Deserialize`, so the server and `conclave worker`
//! share one definition. Opaque user data (task input, output, progress) is a
//! `serde_json::Value`: a `type`-tagged enum buffers its fields, which a borrowed `RawValue`
//! cannot pass through.

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, Refusal};
use super::ids::{LeaseId, SessionId, TaskId, TaskKind, WorkerId};

/// One frame from a worker: an optional `ref` and the command.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerRequest {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(flatten)]
    pub command: WorkerCommand,
}

/// What a worker says, tagged by `type` exactly as in PROTOCOL.md.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WorkerCommand {
    #[serde(rename = "hello")]
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        capabilities: Vec<TaskKind>,
        /// Read wide, so that a negative or huge capacity is refused with a clear message.
        capacity: i64,
    },
    #[serde(rename = "progress")]
    Progress {
        task: TaskId,
        lease: LeaseId,
        #[serde(default)]
        data: serde_json::Value,
    },
    #[serde(rename = "complete")]
    Complete {
        task: TaskId,
        lease: LeaseId,
        #[serde(default)]
        output: serde_json::Value,
    },
    #[serde(rename = "fail")]
    Fail {
        task: TaskId,
        lease: LeaseId,
        error: String,
        /// Absent means retryable: most failures a worker reports are transient.
        #[serde(default = "default_retryable")]
        retryable: bool,
    },
    #[serde(rename = "heartbeat")]
    Heartbeat,
    #[serde(rename = "drain")]
    Drain,
    #[serde(rename = "ping")]
    Ping,
}

fn default_retryable() -> bool {
    true
}

/// The largest `capacity` a worker may declare.
pub const MAX_CAPACITY: i64 = 1024;

/// One task handed to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub id: TaskId,
    pub lease: LeaseId,
    pub kind: TaskKind,
    pub input: serde_json::Value,
    pub session: SessionId,
    pub attempt: u32,
    /// RFC 3339: when the task times out and is retried elsewhere.
    pub deadline: String,
}

/// What the server sends a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum WorkerFrame {
    #[serde(rename = "welcome")]
    Welcome {
        worker: WorkerId,
        heartbeat_s: u64,
        #[serde(default)]
        node: String,
    },
    #[serde(rename = "assign")]
    Assign { task: Assignment },
    #[serde(rename = "cancel")]
    Cancel { task: TaskId },
    /// The answer to a request that carried a `ref`.
    #[serde(rename = "ack")]
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<TaskId>,
    },
    #[serde(rename = "error")]
    Error {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        code: ErrorCode,
        message: String,
        /// The task the refused request was about, so a worker without `ref`s can still tell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<TaskId>,
    },
    #[serde(rename = "pong")]
    Pong,
}

impl WorkerFrame {
    pub fn error(reference: Option<String>, task: Option<TaskId>, refusal: &Refusal) -> Self {
        Self::Error {
            reference,
            code: refusal.code,
            message: refusal.message.clone(),
            task,
        }
    }

    /// Serializes the frame once.
    pub fn encode(&self) -> bytestring::ByteString {
        match serde_json::to_string(self) {
            Ok(text) => text.into(),
            Err(err) => {
                tracing::error!(%err, "worker frame failed to serialize");
                bytestring::ByteString::from_static(
                    r#"{"type":"error","code":"internal","message":"frame encoding failed"}"#,
                )
            }
        }
    }
}

/// Parses one worker frame; anything malformed is a `bad_request` with the `ref` recovered.
pub fn parse_worker_request(text: &str) -> Result<WorkerRequest, super::frames::ParseFailure> {
    serde_json::from_str::<WorkerRequest>(text).map_err(|err| super::frames::ParseFailure {
        reference: super::frames::reference_of(text),
        refusal: Refusal::bad_request(if err.is_syntax() || err.is_eof() {
            format!("frame is not valid JSON: {err}")
        } else {
            format!("invalid frame: {err}")
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_protocol_examples() {
        let hello = parse_worker_request(
            r#"{"type":"hello","token":"t","name":"box-1","capabilities":["code_review","council"],"capacity":4}"#,
        )
        .unwrap();
        assert!(matches!(
            hello.command,
            WorkerCommand::Hello { capacity: 4, ref capabilities, .. } if capabilities.len() == 2
        ));
        let fail = parse_worker_request(r#"{"type":"fail","task":"t","lease":"l","error":"boom"}"#)
            .unwrap();
        assert!(matches!(
            fail.command,
            WorkerCommand::Fail {
                retryable: true,
                ..
            }
        ));
        for bad in [
            r#"{"type":"complete","ref":"3","task":"t"}"#,
            r#"{"type":"hello","ref":"3","capabilities":"x","capacity":1}"#,
            r#"{"type":"assign","ref":"3"}"#,
        ] {
            let failure = parse_worker_request(bad).unwrap_err();
            assert_eq!(failure.reference.as_deref(), Some("3"), "{bad}");
            assert_eq!(failure.refusal.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frame = WorkerFrame::Assign {
            task: Assignment {
                id: TaskId::generate(),
                lease: LeaseId::generate(),
                kind: TaskKind::parse("k").unwrap(),
                input: serde_json::json!({"a": 1}),
                session: SessionId::parse("s").unwrap(),
                attempt: 1,
                deadline: "2026-11-27T00:00:00.000Z".into(),
            },
        };
        let text = frame.encode();
        let back: WorkerFrame = serde_json::from_str(&text).unwrap();
        assert!(matches!(back, WorkerFrame::Assign { task } if task.input["a"] == 1));
    }
}
