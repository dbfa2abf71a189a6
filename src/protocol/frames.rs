//! The native JSON protocol v1 spoken on `/v1/ws`: typed client commands, parsed once at the
//! edge, and the server frames sent back.
//!
//! Every client frame may carry a `ref`; the reply to it carries the same `ref`. Parsing never
//! panics: anything malformed becomes a [`Refusal`] with code `bad_request`, and the `ref` is
//! recovered where the frame was at least JSON, so the client can match the error.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::{ErrorCode, Refusal};
use super::ids::{CouncilId, DocName, SessionId, TaskId};
use crate::session::log::{Actor, Event};
use crate::session::ot::{Component, Operation};

/// One parsed client frame: an optional `ref` and the command.
#[derive(Debug, Deserialize)]
pub struct Request {
    #[serde(rename = "ref", default)]
    pub reference: Option<String>,
    #[serde(flatten)]
    pub command: Command,
}

/// What a client asks for, tagged by `type` exactly as in PROTOCOL.md.
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    #[serde(rename = "hello")]
    Hello {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        name: Option<String>,
    },
    #[serde(rename = "join")]
    Join {
        session: SessionId,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        epoch: Option<String>,
    },
    #[serde(rename = "leave")]
    Leave { session: SessionId },
    #[serde(rename = "chat")]
    Chat { session: SessionId, text: String },
    #[serde(rename = "edit")]
    Edit {
        session: SessionId,
        doc: DocName,
        base: u64,
        ops: Vec<Component>,
    },
    #[serde(rename = "presence")]
    Presence {
        session: SessionId,
        /// Opaque user data: the server relays it and never looks inside. (A tagged enum
        /// buffers its fields, which `RawValue` cannot pass through, so it is parsed here and
        /// re-encoded once for the session.)
        state: serde_json::Value,
    },
    #[serde(rename = "task.submit")]
    TaskSubmit {
        session: SessionId,
        #[serde(flatten)]
        task: crate::tasks::TaskRequest,
    },
    #[serde(rename = "task.cancel")]
    TaskCancel { task: TaskId },
    #[serde(rename = "council.open")]
    CouncilOpen {
        session: SessionId,
        #[serde(flatten)]
        council: crate::council::CouncilRequest,
    },
    #[serde(rename = "council.ballot")]
    CouncilBallot {
        council: CouncilId,
        phase: crate::council::Phase,
        /// Opaque until the council parses it as a proposal or a review.
        ballot: serde_json::Value,
    },
    #[serde(rename = "ping")]
    Ping,
}

impl Command {
    /// The session a command addresses, if it addresses one.
    pub fn session(&self) -> Option<&SessionId> {
        match self {
            Self::Join { session, .. }
            | Self::Leave { session }
            | Self::Chat { session, .. }
            | Self::Edit { session, .. }
            | Self::Presence { session, .. }
            | Self::TaskSubmit { session, .. }
            | Self::CouncilOpen { session, .. } => Some(session),
            Self::Hello { .. }
            | Self::Ping
            | Self::TaskCancel { .. }
            | Self::CouncilBallot { .. } => None,
        }
    }
}

/// Only the `ref` of a frame, read when the full parse failed.
#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref", default)]
    reference: Option<serde_json::Value>,
}

/// The `ref` of a frame, read without parsing the rest, for frames refused before parsing.
pub fn reference_of(text: &str) -> Option<String> {
    serde_json::from_str::<RefOnly>(text)
        .ok()
        .and_then(|r| match r.reference {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        })
}

/// A frame that could not be parsed: the refusal, and the `ref` if one could be recovered.
#[derive(Debug)]
pub struct ParseFailure {
    pub reference: Option<String>,
    pub refusal: Refusal,
}

/// Parses one text frame. The fast path is a single typed parse; only on failure is the frame
/// read a second time to recover its `ref`.
pub fn parse_request(text: &str) -> Result<Request, ParseFailure> {
    serde_json::from_str::<Request>(text).map_err(|err| {
        let reference =
            serde_json::from_str::<RefOnly>(text)
                .ok()
                .and_then(|r| match r.reference {
                    Some(serde_json::Value::String(s)) => Some(s),
                    _ => None,
                });
        let message = if err.is_syntax() || err.is_eof() {
            format!("frame is not valid JSON: {err}")
        } else {
            format!("invalid frame: {err}")
        };
        ParseFailure {
            reference,
            refusal: Refusal::bad_request(message),
        }
    })
}

/// A user as the protocol shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
}

impl UserInfo {
    pub fn actor(&self) -> Actor {
        Actor {
            id: self.id.clone(),
            name: self.name.clone(),
        }
    }
}

/// The roles of DESIGN.md. Without a JWT secret, everyone on loopback is an `editor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Editor,
    Agent,
    Admin,
}

impl Role {
    /// May this role append to a session (chat, edit, tasks, councils)?
    pub fn may_write(self) -> bool {
        matches!(self, Self::Editor | Self::Admin)
    }
}

/// One entry of the `presence` list in `joined`.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceEntry {
    pub conn: String,
    pub user: UserInfo,
    pub state: Box<RawValue>,
}

/// A document as listed in `joined`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DocSummary {
    pub name: String,
    pub version: u64,
    pub text: String,
}

/// Frames the server sends on `/v1/ws`.
#[derive(Debug, Serialize)]
#[serde(tag = "type")]
pub enum ServerFrame<'a> {
    #[serde(rename = "welcome")]
    Welcome {
        conn: &'a str,
        user: &'a UserInfo,
        node: &'a str,
        protocol: u32,
    },
    #[serde(rename = "joined")]
    Joined {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        session: &'a SessionId,
        offset: u64,
        epoch: &'a str,
        members: &'a [UserInfo],
        presence: &'a [PresenceEntry],
        docs: &'a [DocSummary],
    },
    #[serde(rename = "ack")]
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        doc: Option<&'a DocName>,
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        /// The id of a task just submitted.
        #[serde(skip_serializing_if = "Option::is_none")]
        task: Option<&'a TaskId>,
        /// The id of a council just opened.
        #[serde(skip_serializing_if = "Option::is_none")]
        council: Option<&'a CouncilId>,
    },
    /// A committed change to a document; `ops` apply to version `version - 1`.
    #[serde(rename = "doc")]
    Doc {
        session: &'a SessionId,
        doc: &'a DocName,
        version: u64,
        ops: &'a Operation,
        actor: &'a Actor,
    },
    #[serde(rename = "event")]
    Event {
        session: &'a SessionId,
        #[serde(flatten)]
        event: &'a Event,
    },
    #[serde(rename = "presence")]
    Presence {
        session: &'a SessionId,
        conn: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a UserInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        state: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        gone: bool,
    },
    #[serde(rename = "reset")]
    Reset { session: &'a SessionId },
    /// The session was archived; the server forgets the client's membership.
    #[serde(rename = "archived")]
    Archived { session: &'a SessionId },
    #[serde(rename = "error")]
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
    #[serde(rename = "pong")]
    Pong,
}

impl<'a> ServerFrame<'a> {
    /// Serializes the frame once; the text is then shared by every recipient.
    pub fn encode(&self) -> ByteString {
        // Serializing these types cannot fail: every field is a plain value or pre-validated
        // raw JSON, and no map has non-string keys.
        match serde_json::to_string(self) {
            Ok(text) => ByteString::from(text),
            Err(err) => {
                tracing::error!(%err, "server frame failed to serialize");
                ByteString::from_static(
                    r#"{"type":"error","code":"internal","message":"frame encoding failed"}"#,
                )
            }
        }
    }

    pub fn error(reference: Option<&'a str>, refusal: &'a Refusal) -> Self {
        Self::Error {
            reference,
            code: refusal.code,
            message: &refusal.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let r = parse_request(r#"{"type":"join","ref":"1","session":"s","since":4,"epoch":"e"}"#)
            .unwrap();
        assert_eq!(r.reference.as_deref(), Some("1"));
        assert!(matches!(r.command, Command::Join { since: Some(4), .. }));
        let r = parse_request(r#"{"type":"presence","session":"s","state":{"a":[1]}}"#).unwrap();
        match r.command {
            Command::Presence { state, .. } => assert_eq!(state, serde_json::json!({"a": [1]})),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_request(r#"{"type":"ping"}"#).unwrap().command,
            Command::Ping
        ));
    }

    #[test]
    fn malformed_frames_are_bad_requests_with_their_ref() {
        for (text, want_ref) in [
            ("not json", None),
            (r#"{"type":"nope","ref":"7"}"#, Some("7")),
            (r#"{"type":"chat","ref":"8","session":"s"}"#, Some("8")),
            (
                r#"{"type":"chat","ref":"9","session":"s","text":5}"#,
                Some("9"),
            ),
            (
                r#"{"type":"join","ref":"10","session":"bad name"}"#,
                Some("10"),
            ),
            (r#"{"ref":"11"}"#, Some("11")),
            (r#"[1,2]"#, None),
        ] {
            let failure = parse_request(text).unwrap_err();
            assert_eq!(failure.refusal.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(failure.reference.as_deref(), want_ref, "{text}");
        }
    }
}
