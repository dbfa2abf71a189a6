//! The typed commands nodes send each other on the bus, as JSON. A message that does not
//! decode is dropped with a log line and `conclave_bus_corrupt_total`.
//!
//! Two directions per session: [`ToOwner`] on `…:s:{session}:in`, from relays (and from nodes
//! whose scheduler or councils produce an event for the session), and [`RelayFrame`] on
//! `…:s:{session}:out`, the owner's frames for the clients of every relay, in the owner's order.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{DocName, UserInfo};
use crate::session::log::{Actor, NewEvent};
use crate::session::ot::Component;
use crate::session::{ConnId, FrameClass};
use crate::telemetry;

/// A command for the node that owns a session (`Channel::SessionIn`). Externally tagged
/// (`{"append_event": {…}}`), unlike the client protocol: an event's data is a `RawValue`, which
/// cannot pass through the buffering that serde's internally tagged enums do.
///
/// Every command but `append_event` comes from a relay for one of its clients (`conn`); the
/// owner answers on the session's out channel, in [`RelayFrame`]s for that client.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToOwner {
    /// Append an event another node produced for the session (a task or council transition,
    /// already durable in its own table).
    AppendEvent {
        event: NewEvent,
    },
    /// A client of the relay on `node` joins, as `join` does on the owner itself.
    Join {
        node: String,
        conn: ConnId,
        user: UserInfo,
        reference: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
    },
    Chat {
        conn: ConnId,
        actor: Actor,
        text: String,
        reference: Option<String>,
    },
    Edit {
        conn: ConnId,
        actor: Actor,
        doc: DocName,
        base: u64,
        ops: Vec<Component>,
        reference: Option<String>,
    },
    /// Opaque user data, relayed as it came.
    Presence {
        conn: ConnId,
        state: Box<RawValue>,
    },
    Leave {
        conn: ConnId,
        reference: Option<String>,
    },
    /// The client's socket closed.
    Disconnect {
        conn: ConnId,
    },
    /// The relay on `node` is alive and still has these clients (every third of the lease
    /// TTL). The owner forgets the clients of a relay it has not heard from for a whole TTL.
    Keepalive {
        node: String,
        conns: Vec<ConnId>,
    },
    /// A Yjs client of the relay on `node` opens document `doc`.
    YjsAttach {
        node: String,
        conn: ConnId,
        user: UserInfo,
        doc: DocName,
    },
    /// The client's sync step 1: its state vector, encoded (v1).
    YjsSyncStep1 {
        conn: ConnId,
        state_vector: Vec<u8>,
    },
    /// A Yjs update (v1), as the client sent it.
    YjsUpdate {
        conn: ConnId,
        data: Vec<u8>,
    },
    /// An awareness update, encoded (v1).
    YjsAwareness {
        conn: ConnId,
        update: Vec<u8>,
    },
    YjsAwarenessQuery {
        conn: ConnId,
    },
}

impl ToOwner {
    /// The command as JSON; one that cannot be encoded goes as an empty payload, which the
    /// owner counts as corrupt.
    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// One frame of the owner for some clients of its relays (`Channel::SessionOut`): a broadcast
/// goes once for all of them, and each relay hands it to those of `conns` that are its own.
/// `seq` counts the out channel's frames under one owner `epoch` (the lease's), with no holes: a
/// relay that sees one has lost frames (the bus was down) and makes its clients resume from
/// their offsets.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayFrame {
    pub epoch: i64,
    pub seq: u64,
    pub conns: Vec<ConnId>,
    pub body: RelayBody,
}

/// What the clients are to receive, as they are to receive it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayBody {
    /// A JSON frame for a `/v1/ws` client.
    Text {
        frame: String,
        class: FrameClass,
        /// The last frame of the client's membership (`archived`, or the session moved).
        #[serde(default)]
        ends_membership: bool,
    },
    /// A y-websocket frame for a Yjs client (bytes as a JSON array: Yjs frames are small).
    Binary {
        frame: Vec<u8>,
        /// Close the socket after it: the client resyncs by state vector wherever it reconnects.
        #[serde(default)]
        then_close: bool,
    },
}

impl RelayFrame {
    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// Decodes a bus message, or counts and logs it as corrupt.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Option<T> {
    match serde_json::from_slice(payload) {
        Ok(command) => Some(command),
        Err(err) => {
            telemetry::bus_corrupt();
            tracing::warn!(%err, "dropping a corrupt bus message");
            None
        }
    }
}

/// Decodes a command for a session's owner (see [`decode`]).
pub fn decode_to_owner(payload: &[u8]) -> Option<ToOwner> {
    decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::log::{Actor, EventKind};

    #[test]
    fn an_event_round_trips_and_garbage_is_refused() {
        let event = NewEvent::new(
            EventKind::Chat,
            Actor {
                id: "u".into(),
                name: "U".into(),
            },
            &serde_json::json!({"text": "hi", "n": [1, 2]}),
        );
        let encoded = ToOwner::AppendEvent {
            event: event.clone(),
        }
        .encode();
        let Some(ToOwner::AppendEvent { event: decoded }) = decode_to_owner(&encoded) else {
            panic!(
                "the command did not decode: {}",
                String::from_utf8_lossy(&encoded)
            );
        };
        assert_eq!(decoded.kind, event.kind);
        assert_eq!(decoded.data.get(), event.data.get());
        assert_eq!(decoded.at, event.at);
        assert!(decode_to_owner(b"{not json").is_none());
        assert!(decode_to_owner(br#"{"launch_missiles": {}}"#).is_none());
    }
}
